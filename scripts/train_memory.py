"""Peak memory per process of a whole `hetlm train` (preparation, training, E-steps, evaluation) in 1, 2 and 4 local
processes (launch/local.sh, one CPU device each), with and without --own_users.

  python scripts/train_memory.py --log=/tmp/w/events2m --events=2000000 --out=docs/train_memory.json

Writes the log first if --log does not exist (scripts/prep_memory.py's: --events page views of --events/10 users over
1,000 pages, 16 Parquet parts, every user spread over the parts). Every cell trains the same tiny model (K=2, one
round of one pass, no single-LM baselines, --split=hash, --data_shards=P) into a fresh workdir; a worker runs
`hetlm train` in-process and reports its peak resident memory (ru_maxrss) and seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

TRAIN = [
  "--k=2",
  "--rounds=1",
  "--epochs=1",
  "--patience=0",
  "--init=random",
  "--nobaselines",
  "--context=32",
  "--d_model=32",
  "--n_layers=1",
  "--n_heads=2",
  "--d_ff=64",
  "--batch_size=64",
  "--eval_batch_size=1024",
  "--split=hash",
  "--checkpoint_every=100000",
]


def worker(argv: list[str]) -> None:
  from hetlm_jax.main import cli

  start = time.perf_counter()
  code = cli(["hetlm", "train", *argv])
  import jax

  row = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "exit": code,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "seconds": time.perf_counter() - start,
  }
  print("ROW " + json.dumps(row), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--log", default="/tmp/w/events2m")
  parser.add_argument("--events", type=int, default=2_000_000)
  parser.add_argument("--cells", default="1:own,2:own,4:own,2:exchange,4:exchange")
  parser.add_argument("--runs", default="/tmp/w/train_memory", help="where each cell's workdir goes")
  parser.add_argument("--out", default="")
  if sys.argv[1:2] == ["--worker"]:  # the rest are hetlm's flags, untouched
    return worker(sys.argv[2:])
  args = parser.parse_args()
  if not Path(args.log).exists():
    from prep_memory import write_log

    write_log(Path(args.log), args.events)
  runs = []
  for cell in args.cells.split(","):
    p, mode = int(cell.split(":")[0]), cell.split(":")[1]
    workdir = Path(args.runs) / cell.replace(":", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    flags = [f"--data={args.log}", f"--workdir={workdir}", *TRAIN, f"--data_shards={p}"]
    flags += ["--own_users"] if mode == "own" else []
    command = [sys.executable, __file__, "--worker", *flags]
    if p > 1:
      command = [str(REPO / "launch" / "local.sh"), str(p), "1", *command]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    rows = sorted(
      (json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")), key=lambda r: r["process"]
    )
    if done.returncode or len(rows) != p or any(r["exit"] for r in rows):
      sys.exit(done.stderr[-3000:])
    evaluation = json.loads((workdir / "eval.json").read_text())
    run = {
      "processes": p,
      "own_users": mode == "own",
      "wall_s": time.perf_counter() - start,
      "rows": rows,
      "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
      "hetlm_nll": evaluation["models"]["hetlm"]["nll"]["mean"],
      "n_users": evaluation["n_users"],
    }
    runs.append(run)
    print(json.dumps(run), flush=True)
  if args.out:
    meta = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    Path(args.out).write_text(json.dumps({**meta, "data": args.log, "flags": TRAIN, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
  main()
