"""Host memory and seconds of one epoch of training batches (train/batches.py ClusterBatches), for a process
that builds the whole global batch (P=1) or its block of it (--processes=P: 1/P of the rows), on generated
sequences; with --ref=COMMIT, the ClusterBatches of that commit instead (e.g. 3de7d00, which packed a whole epoch
of tokens at once), for the before/after figures of docs/SCALING.md. With --data_shards=S, the ShardedBatches
of this commit (--data_shards): a process plans and builds only the shards its rows hold.

  python scripts/batch_memory.py --users=1000000 --k=8 --out=docs/batch_memory.json
  python scripts/batch_memory.py --users=1000000 --k=8 --refs= --data_shards=4 --out=docs/batch_memory_shards.json

Each cell runs in a fresh process, so its peak RSS is its own; the figure is the peak over the epoch minus the
RSS once the sequences exist.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _sequences(users: int, mean_len: float, vocab: int, seed: int):
  from hetlm_jax.data.sequences import UserSequences

  rng = np.random.default_rng(seed)
  lengths = 2 + rng.geometric(1 / mean_len, users)  # BOS, pages, EOS: browsing histories are short, few long
  offsets = np.zeros(users + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  tokens = rng.integers(4, vocab, int(offsets[-1]), dtype=np.int32)
  split = offsets[1:].copy()
  ids = np.array([f"u{u}" for u in range(users)], object)
  return UserSequences(ids, tokens, offsets, split, np.ones(users, np.int32))


def _batches_class(ref: str):
  if not ref:
    from hetlm_jax.train.batches import ClusterBatches

    return ClusterBatches
  source = subprocess.run(
    ["git", "show", f"{ref}:hetlm_jax/train/batches.py"], check=True, capture_output=True, text=True
  ).stdout
  path = os.path.join(tempfile.mkdtemp(), "batches_ref.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("batches_ref", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.ClusterBatches


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cell(args) -> dict:
  seqs = _sequences(args.users, args.mean_len, 5000, 0)
  ClusterBatches = _batches_class(args.ref)
  assignment = np.random.default_rng(1).integers(0, args.k, seqs.num_users)
  base = _rss_mib()
  start = time.perf_counter()
  rows = slice(0, args.batch // args.processes)
  if args.data_shards > 1:
    from hetlm_jax.train.batches import ShardedBatches

    shape = (args.k, args.batch, args.context, 1)
    batches = ShardedBatches(seqs, assignment, *shape, shards=args.data_shards, rows=rows, seed=0, round_index=0)
  else:
    batches = ClusterBatches(seqs, assignment, args.k, args.batch, args.context, 1, 0, 0)
  real = 0
  for s in range(batches.steps_per_epoch):
    if args.ref:  # the old class builds the whole batch; a process then kept its rows
      tokens, segments, weights = (x[:, rows] for x in batches.batch(s))
    else:
      tokens, segments, weights = batches.batch(s, rows=rows)
    real += int((segments > 0).sum())
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {
    "ref": args.ref or "this commit",
    "data_shards": args.data_shards,
    "processes": args.processes,
    "users": seqs.num_users,
    "tokens": seqs.num_tokens,
    "k": args.k,
    "batch": args.batch,
    "context": args.context,
    "steps_per_epoch": batches.steps_per_epoch,
    "epoch_slots": batches.k * batches.steps_per_epoch * args.batch * (args.context + 1),
    "tokens_built": real,
    "epoch_seconds": round(seconds, 2),
    "peak_mib_over_sequences": round(peak - base, 1),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--users", type=int, default=1_000_000)
  parser.add_argument("--mean_len", type=float, default=8.0, help="mean pages a user (geometric)")
  parser.add_argument("--k", type=int, default=8)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--refs", default="3de7d00,", help="comma-separated commits ('' = this commit)")
  parser.add_argument("--processes_list", default="1,2,4")
  parser.add_argument("--data_shards", type=int, default=1)
  parser.add_argument("--ref", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.ref is not None:  # one cell, in this process
    print(json.dumps(cell(args)))
    return
  rows = []
  for ref in args.refs.split(","):
    for p in (int(x) for x in args.processes_list.split(",")):
      names = ("users", "mean_len", "k", "batch", "context", "data_shards")
      flags = [f"--{name}={getattr(args, name)}" for name in names]
      out = subprocess.run(
        [sys.executable, __file__, *flags, f"--ref={ref}", f"--processes={p}"],
        check=True,
        capture_output=True,
        text=True,
      ).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  result = {
    "command": "python " + " ".join(sys.argv),
    "machine": f"{platform.node()} {os.cpu_count()} cores",
    "date": datetime.date.today().isoformat(),
    "rows": rows,
  }
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
