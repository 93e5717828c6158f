"""Seconds to gather the E-step's per-user results to every process (hosts.gather_arrays), as Trainer.score and
Trainer.embed do when a scoring pass is split among processes: each of P processes sends its share of U users'
K NLL sums (float64) and token counts (what the E-step gathered before it decided each share locally, and what
the evaluation still gathers), then D embedding floats a user, then what the E-step gathers now: each user's new
cluster (int32). Run through launch/local.sh:

  launch/local.sh 2 1 python scripts/gather_time.py --users=624383 --k=8 --d_model=32
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from hetlm_jax import hosts


def main(flags: list[str]) -> None:
  given = {"users": "624383", "k": "8", "d_model": "32", **dict(f.lstrip("-").split("=", 1) for f in flags)}
  hosts.initialize(given["coordinator_address"], int(given["num_processes"]), int(given["process_id"]))
  n = int(given["users"]) // int(given["num_processes"])
  nll_KxU, tokens_U = np.random.default_rng(0).random((int(given["k"]), n)), np.ones(n, np.int64)
  hosts.gather_arrays(np.array(0), nll_KxU[:, :10], tokens_U[:10])  # the first collective sets up the connections
  start = time.perf_counter()
  hosts.gather_arrays(np.array(0), nll_KxU, tokens_U)
  scores_s = time.perf_counter() - start
  means_DxU = np.random.default_rng(1).random((int(given["d_model"]), n))
  start = time.perf_counter()
  hosts.gather_arrays(np.array(0), means_DxU)
  embedding_s = time.perf_counter() - start
  start = time.perf_counter()
  hosts.gather_arrays(np.array(0), np.argmin(nll_KxU, axis=0).astype(np.int32))
  assignment_s = time.perf_counter() - start
  row = {"process": int(given["process_id"]), "processes": int(given["num_processes"]), "users_each": n}
  times = {"scores_gather_s": scores_s, "embedding_gather_s": embedding_s, "assignment_gather_s": assignment_s}
  print(json.dumps({**row, **times}))


if __name__ == "__main__":
  main(sys.argv[1:])
