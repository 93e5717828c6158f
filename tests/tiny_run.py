"""A tiny HeTLM run (two rounds of K=2, about 32 steps) and how to compare two of its workdirs: the preemption
and multi-process tests check that an interrupted or distributed run ends exactly where this one does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from synthetic import markov_events

from hetlm_jax.workdir import read_assignments

REPO = Path(__file__).resolve().parents[1]
FLAGS = [
  "--context=16",
  "--d_model=16",
  "--n_layers=1",
  "--n_heads=2",
  "--d_ff=32",
  "--epochs=2",
  "--batch_size=8",
  "--k=2",
  "--rounds=2",
  "--init=random",
  "--nobaselines",
  "--checkpoint_every=4",
  "--eval_batch_size=64",
]
TIMINGS = ("train_s", "eval_s")  # wall-clock seconds: the only figures allowed to differ


def write_log(path: Path) -> Path:
  pq.write_table(markov_events(n_users=120, n_groups=2, sessions=3, session_len=6)[0], path)
  return path


def train_args(log: Path, workdir: Path, *extra: str) -> list[str]:
  return ["train", f"--data={log}", f"--workdir={workdir}", *FLAGS, *extra]


def hetlm_process(args: list[str], processes: int = 1, devices: int = 4, timeout: int = 300):
  """`hetlm ARGS` in fresh processes: launch/local.sh for several, else one process with `devices` CPU devices."""
  command = [sys.executable, "-m", "hetlm_jax.main", *args]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  if processes > 1:
    command = [str(REPO / "launch" / "local.sh"), str(processes), str(devices), *command]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_result(expected: Path, actual: Path, rtol: float = 1e-5, unlike: tuple[str, ...] = ()) -> None:
  """Same assignment (assignments.parquet, or the parts of a job of several processes, in user order), and
  eval.json equal within float tolerance but for wall-clock times and the keys `unlike` (e.g. "data", a run on
  the same events from another path)."""
  by_user = lambda run: read_assignments(run).sort_by("user_id")
  assert by_user(expected).equals(by_user(actual))
  a, b = (json.loads((d / "eval.json").read_text()) for d in (expected, actual))

  def same(x, y, path):
    if isinstance(x, dict):
      assert set(x) == set(y), path
      for key in x:
        if key not in TIMINGS + unlike:
          same(x[key], y[key], f"{path}.{key}")
    elif isinstance(x, list):
      assert len(x) == len(y), path
      for i, (u, v) in enumerate(zip(x, y)):
        same(u, v, f"{path}[{i}]")
    elif isinstance(x, float):
      np.testing.assert_allclose(y, x, rtol=rtol, atol=1e-6, err_msg=path)
    else:
      assert x == y, path

  same(a, b, "eval.json")


def assert_readable_as(reference: Path, workdir: Path, processes: int = 2) -> None:
  """The Predictor reads `workdir`'s assignment (every training user keeps `reference`'s cluster), and `hetlm
  evaluate` on `processes` processes writes its evaluation again (with the training's provenance, one report)."""
  from hetlm_jax import Predictor

  table = read_assignments(reference)
  users = table["user_id"].to_numpy(zero_copy_only=False)
  routing = Predictor.load(workdir).assign([["/p/2"] for _ in users], user_ids=users)
  assert routing.saved.all() and (routing.cluster == table["cluster"].to_numpy()).all()
  written = (workdir / "eval.json").stat().st_mtime_ns
  again = hetlm_process(["evaluate", f"--workdir={workdir}"], processes=processes, devices=4 // processes)
  assert again.returncode == 0 and again.stdout.count("report: ") == 1, again.stderr[-3000:]
  assert (workdir / "eval.json").stat().st_mtime_ns > written
