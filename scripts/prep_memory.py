"""Peak memory and speed of preparing a log in 1, 2 and 4 local processes (launch/local.sh): each reads only its
own users, the page counts are merged and the sequences exchanged (data/prepare.py).

  python scripts/prep_memory.py --log=/tmp/events20m --events=20000000 --processes=1,2,4 --out=prep_memory.json

Writes the log first if --log does not exist: --events page views of --events/10 users over 1,000 pages, in 16
Parquet parts, rows shuffled so every user's events are spread over the parts. Each run is `launch/local.sh P 1
python scripts/prep_memory.py --worker ...`; a worker joins jax.distributed, runs prepare_data, and reports its
peak resident memory (ru_maxrss; also the peak before the
sequences are exchanged) and seconds. --data=PATH measures another log (e.g. the msnbc file) instead.
--parts_by_user writes each user's events into one part (part = user mod 16) and prepares with --parts_by_user,
so each process opens only its own parts:

  python scripts/prep_memory.py --log=/tmp/events20m_by_user --parts_by_user --out=prep_memory_by_user.json

--own_users prepares with --own_users: no exchange, each process keeps its own users (its peak is then the whole):

  python scripts/prep_memory.py --log=/tmp/events20m --own_users --out=prep_memory_own.json
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_log(folder: Path, events: int, parts: int = 16, by_user: bool = False) -> None:
  """--events page views in `parts` Parquet files: every user's events spread over the parts, or (`by_user`) each
  user's in part user mod `parts`."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  rng = np.random.default_rng(0)
  users = max(events // 10, 1)
  folder.mkdir(parents=True)
  per_part = -(-events // parts)
  ids = pa.array([f"user{u:09d}" for u in range(users)])
  pages = pa.array([f"/page/{p}" for p in range(1000)])
  for i in range(parts):
    n = min(per_part, events - i * per_part)
    user_N = rng.integers(0, users, n)
    if by_user:  # the same number of events, of this part's users only
      user_N = user_N - user_N % parts + i
      user_N = np.where(user_N < users, user_N, i)
    table = pa.table(
      {
        "user_id": ids.take(pa.array(user_N)),
        "timestamp": pa.array(1_700_000_000 + rng.integers(0, 30 * 86_400, n)),
        "page": pages.take(pa.array(np.minimum(rng.zipf(1.3, n), 1000) - 1)),
      }
    )
    pq.write_table(table, folder / f"part-{i:05d}.parquet")


def worker(args) -> None:
  from hetlm_jax import hosts

  hosts.initialize(args.coordinator_address, args.num_processes, args.process_id)
  from hetlm_jax.config import Config, DataConfig
  from hetlm_jax.data import prepare
  from hetlm_jax.data.prepare import prepare_data

  before = {}
  exchange = prepare._exchanged

  def measured(*a):  # the peak so far: reading, counting pages and building this process's users
    before["peak_rss_before_exchange_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return exchange(*a)

  prepare._exchanged = measured
  start = time.perf_counter()
  data = DataConfig(path=args.data, parts_by_user=args.parts_by_user, own_users=args.own_users)
  prepared = prepare_data(Config(data=data))
  seconds = time.perf_counter() - start
  row = {
    "process": max(args.process_id, 0),
    "processes": max(args.num_processes, 1),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "seconds": seconds,
    "events": prepared.stats["events"],
    "users": prepared.seqs.num_users,
    "users_here": prepared.stats.get("users_by_process", [prepared.seqs.num_users])[max(args.process_id, 0)],
    **before,
  }
  print("ROW " + json.dumps(row), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--log", default="/tmp/events20m")
  parser.add_argument("--data", default="")
  parser.add_argument("--events", type=int, default=20_000_000)
  parser.add_argument("--processes", default="1,2,4")
  parser.add_argument("--out", default="")
  parser.add_argument("--parts_by_user", action="store_true", help="write (or read) each user's events in one part")
  parser.add_argument("--own_users", action="store_true", help="each process keeps its own users (no exchange)")
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--coordinator_address", default="")
  parser.add_argument("--num_processes", type=int, default=0)
  parser.add_argument("--process_id", type=int, default=-1)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  data = args.data or args.log
  if not args.data and not Path(args.log).exists():
    write_log(Path(args.log), args.events, by_user=args.parts_by_user)
  runs = []
  for p in (int(x) for x in args.processes.split(",")):
    command = [sys.executable, __file__, "--worker", f"--data={data}"] + ["--parts_by_user"] * args.parts_by_user
    command += ["--own_users"] * args.own_users
    if p > 1:
      command = [str(REPO / "launch" / "local.sh"), str(p), "1", *command]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
      sys.exit(done.stderr[-3000:])
    rows = sorted(
      (json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")), key=lambda r: r["process"]
    )
    run = {
      "processes": p,
      "wall_s": time.perf_counter() - start,
      "rows": rows,
      "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
    }
    runs.append(run)
    print(json.dumps(run))
  if args.out:
    meta = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    Path(args.out).write_text(json.dumps({**meta, "data": data, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
  main()
