"""SIGTERM and SIGINT stop training cleanly and resume exactly; SIGKILL at any point loses only the steps since
the last checkpoint; a NaN loss stops the run with one line, keeping the last good checkpoint."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pyarrow.parquet as pq
import pytest
from tiny_run import assert_same_result, hetlm_process, train_args

from hetlm_jax.main import cli


def latest_step(workdir, model="hetlm"):
  return ocp.CheckpointManager((workdir / "checkpoints" / model).absolute()).latest_step()


@pytest.mark.parametrize("signal_name,step", [("sigterm", 5), ("sigint", 8), ("sigterm", 21)])
def test_a_signal_saves_a_checkpoint_at_that_step_exits_0_and_the_same_command_resumes_exactly(
  tiny_reference, tmp_path, capsys, signal_name, step
):
  """Steps 5 (inside a pass), 8 (a pass's last step: validation comes first) and 21 (the second round)."""
  log, reference = tiny_reference
  args = train_args(log, tmp_path / "run")
  assert cli(["hetlm", *args, f"--inject={signal_name}@{step}"]) == 0
  out = capsys.readouterr().out
  assert f"{signal_name.upper()}: stopped at step {step} of hetlm" in out
  resume = out.strip().splitlines()[-1].strip()
  assert resume.startswith("hetlm train ") and "--inject" not in resume and f"--workdir={tmp_path / 'run'}" in resume
  assert latest_step(tmp_path / "run") == step
  assert not (tmp_path / "run" / "eval.json").exists()
  assert cli(["hetlm", *args]) == 0
  assert_same_result(reference, tmp_path / "run")


def test_sigkill_at_several_points_then_the_same_command_ends_exactly_as_the_uninterrupted_run(
  tiny_reference, tmp_path, capsys
):
  """Killed right after step 5 (the checkpoint of step 4 may still be being written), then, resumed, after step 22
  (the second round); the third start finishes."""
  log, reference = tiny_reference
  args = train_args(log, tmp_path / "run")
  # A checkpoint written in the background may not have reached the disk before the kill: the one before counts.
  for step, saved in ((5, {0, 4}), (22, {16, 20})):
    killed = hetlm_process([*args, f"--inject=sigkill@{step}"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (latest_step(tmp_path / "run") or 0) in saved
  assert cli(["hetlm", *args]) == 0
  capsys.readouterr()
  assert_same_result(reference, tmp_path / "run")


def test_a_nan_loss_stops_the_run_with_one_line_naming_the_step_and_keeps_the_last_good_checkpoint(
  tiny_reference, tmp_path, capsys
):
  log, _ = tiny_reference
  assert cli(["hetlm", *train_args(log, tmp_path / "run"), "--inject=nan@6"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("hetlm: error: hetlm: the training loss is nan at step 6"), err
  assert "last good checkpoint (step 4)" in err[0]
  assert latest_step(tmp_path / "run") == 4
  restored = ocp.CheckpointManager((tmp_path / "run" / "checkpoints" / "hetlm").absolute()).restore(
    4, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))


def test_a_metrics_line_cut_short_by_a_kill_is_skipped_and_the_next_record_starts_a_new_line(tmp_path):
  from hetlm_jax.train.metrics import MetricsLog

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"kind": "train", "step": 4}\n{"kind": "train", "st')
  log = MetricsLog(path)
  assert log.records("train") == [{"kind": "train", "step": 4}]
  log.write({"kind": "train", "step": 5})
  assert [r["step"] for r in MetricsLog(path).records("train")] == [4, 5]


def _files(workdir):
  """Every file of a workdir but the lock, checkpoints by model and step."""
  return sorted(
    str(p.relative_to(workdir))
    for p in workdir.rglob("*")
    if p.is_file() and p.name != ".lock" and "checkpoints" not in p.parts
  ) + sorted(f"{m.name}/{s.name}" for m in (workdir / "checkpoints").iterdir() for s in m.iterdir() if s.name.isdigit())


def test_a_signal_in_each_phase_outside_training_stops_there_with_exit_0_no_partial_file_and_the_run_ends_as_a_lone_one(
  tiny_reference, tmp_path, capsys, monkeypatch
):
  """One run (k-means initialisation, so every phase exists) stopped in turn while preparing the data, after the
  initial k-means, in the first E-step, during the evaluation and before the report; then `hetlm evaluate` stopped
  in its evaluation and before its report. Each stop exits 0 with one message and writes nothing partial; the last
  start ends with the files and figures of an uninterrupted run."""
  log, _ = tiny_reference
  reference, run = tmp_path / "reference", tmp_path / "run"
  assert cli(["hetlm", *train_args(log, reference, "--init=features")]) == 0
  args = train_args(log, run, "--init=features")
  capsys.readouterr()

  def stop(phase, said, *command):
    assert cli(["hetlm", *(command or args), f"--inject=sigterm@{phase}"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert said in lines[-2] and lines[-2].startswith("SIGTERM: stopped "), printed
    assert lines[-1].strip().startswith(f"hetlm {(command or args)[0]} ") and "--inject" not in lines[-1]
    assert not list(run.rglob("*.tmp")), "a temporary file was left"
    return lines[-2]

  marker = tmp_path / "job.stopped"  # what launch/slurm.sbatch reads to requeue the job
  monkeypatch.setenv("HETLM_STOP_MARKER", str(marker))
  said = stop("prepare", "while preparing the data; nothing was written")
  assert not run.exists() and marker.read_text() == said.removesuffix(":") + "\n"
  marker.unlink()
  monkeypatch.delenv("HETLM_STOP_MARKER")
  stop("kmeans", "after hetlm's initial assignment, before its first step; nothing of it was saved")
  assert latest_step(run) is None and not (run / "assignments.parquet").exists()
  said = stop("estep", "of hetlm, with a checkpoint there")
  rounds = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "round"]
  assert len(rounds) == 1 and f"at step {latest_step(run)} " in said
  assert pq.read_table(run / "assignments.parquet").num_rows == 120  # the first E-step's, whole
  for phase, where in (("evaluate", "evaluating, after hetlm"), ("report", "before writing the report")):
    stop(phase, f"{where}; eval.json and report.md are as they were")
    assert not (run / "eval.json").exists() and not (run / "report.md").exists()
  monkeypatch.setenv("HETLM_STOP_MARKER", str(marker))
  assert cli(["hetlm", *args]) == 0
  assert not marker.exists()  # a run that finishes leaves none: nothing to requeue
  monkeypatch.delenv("HETLM_STOP_MARKER")
  assert_same_result(reference, run)
  assert _files(run) == _files(reference)

  written = {name: (run / name).read_bytes() for name in ("eval.json", "report.md", "nll_per_user.png")}
  for phase in ("evaluate", "report"):
    stop(phase, "eval.json and report.md are as they were", "evaluate", f"--workdir={run}")
    assert {name: (run / name).read_bytes() for name in written} == written


def test_one_stop_handler_serves_the_whole_command_and_a_second_ctrl_c_stops_at_once():
  import os
  import signal

  from hetlm_jax import interrupt
  from hetlm_jax.errors import HetlmError

  before = signal.getsignal(signal.SIGTERM)
  with interrupt.stop_handler() as outer:
    interrupt.safe_point("nowhere", "nothing")  # no stop asked for: goes on
    with interrupt.stop_handler() as inner:  # a nested caller (train_family) shares the command's handler
      assert inner is outer
      os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(interrupt.Stopped, match="SIGTERM: stopped after the test; nothing was written"):
      interrupt.safe_point("after the test", "nothing was written")
    with pytest.raises(KeyboardInterrupt):  # after a first signal, Ctrl-C stops at once
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(10**6):  # the handler runs between two bytecodes
        pass
  assert signal.getsignal(signal.SIGTERM) is before
  interrupt.safe_point("outside any command", "nothing")  # no handler: no stop
  for bad in ("nan@evaluate", "sigterm@train", "sigterm@0", "sigterm"):
    with pytest.raises(HetlmError, match="expected KIND@STEP"):
      interrupt.inject(bad)
  interrupt.inject("")
