"""Host seconds of the evaluation's next-page ranking per million users, by vocabulary size and by the share of a
batch's rows one process ranks: what `rank_next_pages` does on the host with each batch's [B, V] log-probabilities
(full ranking over every page, and against sampled negatives), measured without the devices on random
log-probabilities. With G groups of processes, one process ranks only its B / G rows of every batch (and receives
only those rows' V log-probabilities from its devices, 4 V bytes a user, instead of every row's).

  python scripts/ranking_host.py --vocab=1000,10000,50000 --groups=1,2,4 --out=docs/ranking_host.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from hetlm_jax.eval import metrics as M


def seconds_per_million(vocab: int, rows: int, batches: int, negatives: int) -> float:
  """Mean host seconds of ranking `batches` batches of `rows` users, per million users."""
  rng = np.random.default_rng(0)
  candidate_V = np.arange(vocab) >= 4
  logp_BxV = rng.standard_normal((rows, vocab)).astype(np.float32)
  true_B = rng.integers(4, vocab, rows)
  neg_BxQ = rng.integers(4, vocab, (rows, negatives))
  ok_B = np.ones(rows, bool)
  start = time.perf_counter()
  for _ in range(batches):
    M.ranking_metrics(logp_BxV, true_B, candidate_V, unknown=1)
    M.negatives_ranking_metrics(logp_BxV, true_B, neg_BxQ, ok_B, candidate_V, unknown=1)
  return (time.perf_counter() - start) / (batches * rows) * 1e6


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", default="1000,10000,50000")
  parser.add_argument("--groups", default="1,2,4")
  parser.add_argument("--batch_rows", type=int, default=512)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--negatives", type=int, default=100)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rows = []
  for vocab in map(int, args.vocab.split(",")):
    for groups in map(int, args.groups.split(",")):
      per_user = seconds_per_million(vocab, args.batch_rows // groups, args.batches, args.negatives)
      # One process ranks U / G users: its seconds per million users of the whole job.
      row = {"vocab": vocab, "groups": groups, "rows_a_batch": args.batch_rows // groups}
      row |= {
        "host_s_per_million_users": per_user / groups,
        "fetched_mib_per_million_users": 4 * vocab * 1e6 / 2**20 / groups,
      }
      rows.append(row)
      print(json.dumps(row))
  if args.out:
    meta = {"command": "python scripts/ranking_host.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items())}
    meta |= {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": str(datetime.date.today())}
    with open(args.out, "w") as f:
      json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
