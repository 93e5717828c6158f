"""Peak memory and stage times of one HeTLM round (K=4) on the first N users of the UCI msnbc file.

  python scripts/scale_msnbc.py --data=/path/msnbc990928.zip --max_users=100000,300000,0 --out=scale.json

Each size runs `python -m hetlm_jax train` (the hetlm_jax this Python imports; PYTHONPATH may point at
another checkout) with --init=random, one round of one pass, no baselines and no early stopping, as a
child process. Its resident memory is sampled from /proc every --sample_s (WORKDIR.rss.tsv) and its
peak is read from os.wait4 (ru_maxrss). Stage times come from WORKDIR/metrics.jsonl, eval.json and the run's log:
prep = prepare_s (read, tokenise, build sequences); train = the log's "data:" line to the end of the pass
(building the trainer, compiling, the pass); score = the E-step (every user's history under the K models,
then reassignment); eval = eval.json's eval_s; total = the child's wall time. --max_users=0 is the whole
file. The output JSON (a list, one object per size) is rewritten after every size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hetlm_jax.workdir import read_eval, read_metrics

# absl's log prefix: I1128 17:41:56.743746 ...
_ABSL_TIME = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) ")
_MARKS = {
  "data": re.compile(r"\] data: "),
  "trained": re.compile(r"\] hetlm round 1(/\d+)?: [\d.]+ passes, kept pass"),
  "scored": re.compile(r"\] hetlm round 1: [\d.]+% of users moved"),
  "eval_start": re.compile(r"\] evaluating hetlm$"),
}


def _log_time(line: str, year: int) -> float | None:
  m = _ABSL_TIME.match(line)
  if m is None:
    return None
  month, day, h, mi, s, us = (int(g) for g in m.groups())
  return datetime.datetime(year, month, day, h, mi, s, us).timestamp()


def _rss_mib(pid: int) -> float | None:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def run_size(args, max_users: int) -> dict:
  workdir = Path(args.workdir_root) / f"users_{max_users or 'all'}"
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.mkdir(parents=True)
  cmd = [
    sys.executable,
    "-m",
    "hetlm_jax",
    "train",
    f"--data={args.data}",
    "--format=msnbc",
    f"--max_users={max_users}",
    "--k=4",
    "--rounds=1",
    "--epochs=1",
    "--patience=0",
    "--init=random",
    "--nobaselines",
    f"--batch_size={args.batch_size}",
    f"--eval_batch_size={args.eval_batch_size}",
    f"--workdir={workdir}",
  ]
  print(" ".join(cmd), flush=True)
  samples = []  # (wall time, RSS MiB)
  marks = {}
  start = time.time()
  child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
  done = threading.Event()

  def sample():
    while not done.is_set():
      rss = _rss_mib(child.pid)
      if rss is not None:
        samples.append((time.time(), rss))
      if args.max_eval_s and "scored" in marks and time.time() - marks["scored"] > args.max_eval_s:
        stop()
      done.wait(args.sample_s)

  def stop():
    nonlocal stopped_early
    if not stopped_early and child.poll() is None:
      stopped_early = True
      child.send_signal(signal.SIGTERM)

  stopped_early = False
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  year = datetime.date.today().year
  with open(workdir.parent / f"{workdir.name}.log", "w") as log:
    for line in child.stdout:
      log.write(line)
      log.flush()
      line = line.rstrip("\n")
      for name, pattern in _MARKS.items():
        if name not in marks and pattern.search(line):
          marks[name] = _log_time(line, year) or time.time()
      if args.stop_after_round and "scored" in marks:
        stop()  # the evaluation is skipped: the round is what is measured
  _, status, usage = os.wait4(child.pid, 0)
  end = time.time()
  done.set()
  sampler.join()
  with open(workdir.parent / f"{workdir.name}.rss.tsv", "w") as f:  # seconds since start, RSS MiB
    f.writelines(f"{t - start:.2f}\t{rss:.1f}\n" for t, rss in samples)
  if status != 0 and not stopped_early:
    raise SystemExit(f"hetlm train failed ({status}); see {workdir.parent / (workdir.name + '.log')}")

  records = read_metrics(workdir)
  first = next(r for r in records if r["kind"] == "start")
  train = [r for r in records if r["kind"] == "train" and r.get("model") == "hetlm"]
  report = read_eval(workdir)
  eval_s = report["eval_s"] if report else None

  def peak(t0: float, t1: float) -> float | None:
    inside = [rss for t, rss in samples if t0 <= t <= t1]
    return round(max(inside), 1) if inside else None

  prep_s = first["prepare_s"]
  t_data, t_trained, t_scored = marks["data"], marks["trained"], marks["scored"]
  result = {
    "max_users": max_users,
    "users_read": first["data"]["users_in"],
    "users_kept": first["users"],
    "events": first["data"]["events"],
    "tokens": first["data"]["tokens"],
    "vocab_size": first["vocab_size"],
    "batch_size": args.batch_size,
    "train_steps": sum(r["steps"] for r in train),
    # Real tokens over the pass's step time (its first window includes compiling the step).
    "train_tokens_per_s": round(
      sum(r["tokens_per_s"] * r["step_time_s"] * r["steps"] for r in train)
      / sum(r["step_time_s"] * r["steps"] for r in train)
    ),
    "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    "peak_rss_mib_to_round_end": peak(start, t_scored),
    "peak_rss_mib_by_stage": {
      "startup_and_prep": peak(start, t_data),
      "train": peak(t_data, t_trained),
      "score": peak(t_trained, t_scored),
      "eval": peak(t_scored, end),
    },
    "prep_s": round(prep_s, 2),
    "startup_s": round(t_data - start - prep_s, 2),  # imports, JAX start-up, the validation slice
    "train_s": round(t_trained - t_data, 2),
    "score_s": round(t_scored - t_trained, 2),
    "to_round_end_s": round(t_scored - start, 2),
    "eval_s": None if eval_s is None else round(eval_s, 2),
    "after_round_s": round(end - t_scored, 2),  # evaluation, report.md and exit
    "total_s": round(end - start, 2),
    "cpu_user_s": round(usage.ru_utime, 1),
    "cpu_sys_s": round(usage.ru_stime, 1),
    "evaluated": not stopped_early,
    "command": " ".join(cmd),
  }
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="msnbc990928.zip (or the .seq file)")
  parser.add_argument("--max_users", default="0", help="sizes, separated by commas, run in this order (0: all)")
  parser.add_argument("--out", required=True, help="JSON list, one object per size")
  parser.add_argument("--workdir_root", default="/tmp/scale_msnbc")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--eval_batch_size", type=int, default=512)
  parser.add_argument("--sample_s", type=float, default=0.1, help="seconds between RSS samples")
  parser.add_argument(
    "--stop_after_round",
    action="store_true",
    help="end the run once the round's reassignment is logged (no evaluation)",
  )
  parser.add_argument(
    "--max_eval_s", type=float, default=0, help="end the run if the evaluation takes longer than this (0: no limit)"
  )
  args = parser.parse_args()
  results = []
  for max_users in (int(x) for x in args.max_users.split(",")):
    results.append(run_size(args, max_users))
    print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
  if len(results) >= 3:
    import numpy as np

    users = [r["users_read"] for r in results]
    for key in ("peak_rss_mib", "peak_rss_mib_to_round_end"):
      b, a = np.polyfit(users, [r[key] for r in results], 1)
      print(f"{key} = {a:.1f} MiB + {b * 1e6:.1f} MiB per million users read", flush=True)


if __name__ == "__main__":
  sys.exit(main())
