"""Host seconds of the E-step's bookkeeping per million users, at several numbers of users of one log: the
O(batch rows) claim of docs/SCALING.md, measured without the devices (bench/run.py's score_host_seconds).

  python scripts/estep_host.py --data=/path/msnbc990928.zip --users=100000,0 --groups=1,2,4 --out=estep_host.json

The log is read and prepared once (the whole file); each size takes the first N of its users (0: all). K and
d_model size the k-means embedding's per-user sums (K x d_model floats a user). With G groups of processes
(--groups; Trainer.score on a mesh whose rows span G hosts), one process lays out only its group's G-th of the users
on batch_rows / G rows a batch: the row is group 0's share, and its seconds are still given per million users of the
whole (so G=2 at half the G=1 figure is the work divided by 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from hetlm_jax.bench.run import score_host_seconds
from hetlm_jax.config import Config, DataConfig
from hetlm_jax.data.prepare import prepare_data


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--users", default="100000,0", help="comma-separated numbers of users (0: all)")
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--batch_rows", type=int, default=512)
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=32)
  parser.add_argument("--groups", default="1", help="comma-separated numbers of process groups sharing a pass")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  cfg = Config(data=DataConfig(path=args.data))
  seqs = prepare_data(cfg).seqs
  rows = []
  for n in (int(x) for x in args.users.split(",")):
    subset = seqs if n == 0 or n >= seqs.num_users else seqs.subset(np.arange(n))
    for groups in (int(g) for g in args.groups.split(",")):
      start = time.perf_counter()  # what Trainer.score does first: a copy of the group's users
      share = subset.subset(np.array_split(np.arange(subset.num_users), groups)[0]) if groups > 1 else subset
      row = {"users": subset.num_users, "tokens": subset.num_tokens, "groups": groups, "share_users": share.num_users}
      row["share_copy_s"] = time.perf_counter() - start
      measured = score_host_seconds(share, args.context + 1, args.batch_rows // groups, args.k, args.d_model)
      scale = share.num_users / subset.num_users  # seconds per million users of the whole pass
      row.update({key: value * scale if key.endswith("_users") else value for key, value in measured.items()})
      rows.append(row)
      print(json.dumps(row))
  if args.out:
    meta = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    with open(args.out, "w") as f:
      json.dump({**meta, **vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
