"""One writer per workdir: a second run is refused in one line and changes nothing; a killed holder's lock is gone."""

import json
import os
import signal
import subprocess
import sys
import time

from tiny_run import REPO, assert_same_result, train_args

from hetlm_jax.lock import LOCK_FILE, WorkdirLock
from hetlm_jax.main import cli

HOLD = (
  "import sys, time; from pathlib import Path; from hetlm_jax.lock import WorkdirLock; "
  "WorkdirLock(Path(sys.argv[1]), 'train').__enter__(); print('held', flush=True); time.sleep(600)"
)


def _snapshot(workdir):
  return {p.relative_to(workdir): (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob("*")}


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_not_stale(
  tiny_reference, tmp_path, capsys
):
  log, reference = tiny_reference
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(reference)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = _snapshot(reference)
    for command in (
      train_args(log, reference),
      ["evaluate", f"--workdir={reference}"],
      ["predict", f"--workdir={reference}", f"--data={log}", f"--out={reference / 'p.parquet'}"],
    ):
      assert cli(["hetlm", *command]) == 2, command
      err = capsys.readouterr().err.strip().splitlines()
      assert len(err) == 1 and "another run is writing there" in err[0], err
      assert f"pid {holder.pid} on {os.uname().nodename}" in err[0], err
    assert _snapshot(reference) == before  # the refused runs wrote nothing
    # Reading is not writing: a prediction written elsewhere needs no lock.
    assert cli(["hetlm", "predict", f"--workdir={reference}", f"--data={log}", f"--out={tmp_path / 'p.parquet'}"]) == 0
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert json.loads((reference / LOCK_FILE).read_text())["pid"] == holder.pid  # the file names a dead holder...
  with WorkdirLock(reference, "test"):  # ...whose lock the OS released
    pass


def test_two_trains_started_together_one_is_refused_the_other_ends_as_a_lone_run(tiny_reference, tmp_path, capsys):
  log, reference = tiny_reference
  workdir = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  first = subprocess.Popen(
    [sys.executable, "-m", "hetlm_jax.main", *train_args(log, workdir)],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 120
  while not (workdir / LOCK_FILE).exists() or str(first.pid) not in (workdir / LOCK_FILE).read_text():
    assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
    time.sleep(0.1)
  assert cli(["hetlm", *train_args(log, workdir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"pid {first.pid}" in err[0], err
  out, errors = first.communicate(timeout=300)
  assert first.returncode == 0, errors[-3000:]
  assert_same_result(reference, workdir)
