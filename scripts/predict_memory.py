"""Speed and peak memory of `hetlm predict` on a log in time order (every user's events interleaved with the
others'), grouped by user in memory or through bucket files, against the one pass of --grouped on the same log
sorted by user.

  python scripts/predict_memory.py --root=/tmp/predict_bench --events=2000000 --memory_mb=8,32,1024 \\
      --out=docs/predict_memory.json

Writes under --root, once: the log as 16 Parquet parts cut in time order (events of --events/10 users over 1,000
pages), the same events sorted by user in one file, and a small run (configs/tiny.flags, K=2) trained on the first
2,000 users. Then each case is one `hetlm predict` process on one CPU device; its summary line gives the seconds,
the grouping (buckets, largest bucket, first-pass events/s) and the peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_logs(root: Path, events: int, parts: int = 16) -> None:
  import pyarrow as pa
  import pyarrow.compute as pc
  import pyarrow.parquet as pq

  rng = np.random.default_rng(0)
  users = max(events // 10, 1)
  ids = pa.array([f"user{u:09d}" for u in range(users)])
  pages = pa.array([f"/page/{p}" for p in range(1000)])
  user_N = rng.integers(0, users, events)
  time_N = 1_700_000_000 + rng.integers(0, 30 * 86_400, events)
  order = np.argsort(time_N, kind="stable")
  table = pa.table(
    {
      "user_id": ids.take(pa.array(user_N[order])),
      "timestamp": pa.array(time_N[order]),
      "page": pages.take(pa.array(np.minimum(rng.zipf(1.3, events), 1000) - 1)),
    }
  )
  (root / "by_time").mkdir(parents=True)
  per_part = -(-events // parts)
  for i in range(parts):  # a day's export after another: each part a stretch of time, every user in many parts
    pq.write_table(table.slice(i * per_part, per_part), root / "by_time" / f"part-{i:05d}.parquet")
  pq.write_table(table.sort_by([("user_id", "ascending"), ("timestamp", "ascending")]), root / "by_user.parquet")
  first = pa.array([f"user{u:09d}" for u in range(2000)])
  pq.write_table(table.filter(pc.is_in(table["user_id"], first)), root / "train.parquet")


def hetlm(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "hetlm_jax.main", *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", type=Path, default=Path("/tmp/predict_bench"))
  parser.add_argument("--events", type=int, default=2_000_000)
  parser.add_argument("--memory_mb", default="8,32,1024", help="the budgets of the default (grouping) runs")
  parser.add_argument("--chunk_users", type=int, default=4096)
  parser.add_argument("--out", type=Path, default=Path("predict_memory.json"))
  args = parser.parse_args()
  if not (args.root / "by_user.parquet").exists():
    write_logs(args.root, args.events)
  run = args.root / "run"
  if not (run / "eval.json").exists():
    done = hetlm(
      "train",
      f"--data={args.root / 'train.parquet'}",
      f"--workdir={run}",
      "--flagfile=configs/tiny.flags",
      "--k=2",
      "--rounds=2",
      "--nobaselines",
    )
    if done.returncode:
      sys.exit(done.stderr[-3000:])
  import pyarrow.parquet as pq

  in_memory_mib = pq.read_table(args.root / "by_user.parquet").nbytes / 2**20
  cases = [("by_user.parquet", "--grouped")] + [("by_time", f"--memory_mb={m}") for m in args.memory_mb.split(",")]
  rows = []
  for data, flag in cases:
    out = args.root / "predictions.parquet"
    done = hetlm(
      "predict",
      f"--workdir={run}",
      f"--data={args.root / data}",
      f"--out={out}",
      f"--chunk_users={args.chunk_users}",
      "--top_k=10",
      flag,
    )
    if done.returncode:
      sys.exit(done.stderr[-3000:])
    first, second = done.stdout.splitlines()[:2]
    number = lambda pattern, text: float(re.search(pattern, text).group(1).replace(",", ""))
    row = {
      "data": data,
      "flag": flag,
      "users": int(number(r"predicted ([\d,]+) users", first)),
      "events": int(number(r"\(([\d,]+) events\)", first)),
      "seconds": number(r"in ([\d.]+)s", first),
      "users_per_s": number(r"([\d,]+) users/s", first),
      "grouping": first.split("; ", 1)[1],
      "peak_rss_mib": number(r"peak memory ([\d,]+) MiB", second),
    }
    if "first pass" in first:
      row["first_pass_events_per_s"] = number(r"first pass ([\d,]+) events/s", first)
    print(json.dumps(row), flush=True)
    rows.append(row)
  result = {
    "command": "python scripts/predict_memory.py " + " ".join(sys.argv[1:]),
    "date": datetime.date.today().isoformat(),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "log_in_memory_mib": in_memory_mib,
    "rows": rows,
  }
  args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
