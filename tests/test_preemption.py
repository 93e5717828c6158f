"""SIGTERM and SIGINT stop training cleanly and resume exactly; SIGKILL at any point loses only the steps since
the last checkpoint; a NaN loss stops the run with one line, keeping the last good checkpoint."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hetlm_jax.main import cli
from tiny_run import assert_same_result, hetlm_process, train_args


def latest_step(workdir, model="hetlm"):
  return ocp.CheckpointManager((workdir / "checkpoints" / model).absolute()).latest_step()


@pytest.mark.parametrize("signal_name,step", [("sigterm", 5), ("sigint", 8), ("sigterm", 21)])
def test_a_signal_saves_a_checkpoint_at_that_step_exits_0_and_the_same_command_resumes_exactly(
    tiny_reference, tmp_path, capsys, signal_name, step):
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
    tiny_reference, tmp_path, capsys):
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
    tiny_reference, tmp_path, capsys):
  log, _ = tiny_reference
  assert cli(["hetlm", *train_args(log, tmp_path / "run"), "--inject=nan@6"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("hetlm: error: hetlm: the training loss is nan at step 6"), err
  assert "last good checkpoint (step 4)" in err[0]
  assert latest_step(tmp_path / "run") == 4
  restored = ocp.CheckpointManager((tmp_path / "run" / "checkpoints" / "hetlm").absolute()).restore(
    4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))


def test_a_metrics_line_cut_short_by_a_kill_is_skipped_and_the_next_record_starts_a_new_line(tmp_path):
  from hetlm_jax.train.metrics import MetricsLog
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"kind": "train", "step": 4}\n{"kind": "train", "st')
  log = MetricsLog(path)
  assert log.records("train") == [{"kind": "train", "step": 4}]
  log.write({"kind": "train", "step": 5})
  assert [r["step"] for r in MetricsLog(path).records("train")] == [4, 5]
