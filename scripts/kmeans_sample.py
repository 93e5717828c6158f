"""Seconds and peak memory of the k-means initialisation's host work (cluster/assign.py) on generated user
embeddings: k-means fitted on every user (what --kmeans_users at or above U does) against fitted on a sample of
users and every user placed at the nearest centre (what a larger U does). Each cell runs in a fresh process.

  python scripts/kmeans_sample.py --users=1000000 --d_model=64 --k=8 --samples=0,100000 --out=docs/kmeans_sample.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def cell(users: int, d_model: int, k: int, sample: int) -> dict:
  from sklearn.cluster import KMeans
  from sklearn.preprocessing import normalize

  from hetlm_jax.cluster.assign import kmeans

  rng = np.random.default_rng(0)
  centres = rng.normal(size=(k, d_model))
  x = rng.normal(scale=2.0, size=(users, d_model))  # k overlapping blobs, built in place: the peak so far is x
  blob = rng.integers(0, k, users)
  for at in range(0, users, 65536):
    x[at : at + 65536] += centres[blob[at : at + 65536]]
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  if sample == 0 or sample >= users:
    labels = kmeans(x, k, 0)
  else:
    fitted = np.sort(rng.choice(users, sample, replace=False))
    labels = KMeans(k, n_init=4, random_state=0).fit(normalize(x[fitted])).predict(normalize(x)).astype(np.int32)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {
    "users": users,
    "d_model": d_model,
    "k": k,
    "fitted_on": sample or users,
    "seconds": round(seconds, 2),
    "peak_mib_over_embeddings": round(peak - base, 1),
    "sizes": np.bincount(labels, minlength=k).tolist(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--users", type=int, default=1_000_000)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--samples", default="0,100000", help="comma-separated sample sizes (0: every user)")
  parser.add_argument("--cell", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.cell is not None:
    print(json.dumps(cell(args.users, args.d_model, args.k, args.cell)))
    return
  rows = []
  for sample in (int(x) for x in args.samples.split(",")):
    flags = [f"--users={args.users}", f"--d_model={args.d_model}", f"--k={args.k}", f"--cell={sample}"]
    out = subprocess.run([sys.executable, __file__, *flags], check=True, capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(rows[-1], flush=True)
  if args.out:
    meta = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    with open(args.out, "w") as f:
      json.dump({**meta, "command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
