"""Two processes on localhost (jax.distributed, CPU collectives, two devices each) against one process with four."""

import json

from hetlm_jax.main import cli
from tiny_run import assert_same_result, hetlm_process, train_args


def test_two_processes_end_as_one_process_with_four_devices_and_only_process_0_writes(tiny_reference, tmp_path):
  log, reference = tiny_reference
  done = hetlm_process(train_args(log, tmp_path / "two"), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_result(reference, tmp_path / "two")
  assert done.stdout.count("report: ") == 1  # the summary comes from process 0 alone
  # Written once: as many records as the one-process run, and the same files.
  lines = lambda d: [json.loads(line)["kind"] for line in (d / "metrics.jsonl").read_text().splitlines()]
  assert lines(tmp_path / "two") == lines(reference)
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in reference.iterdir())


def test_sigterm_stops_both_processes_at_one_step_and_one_process_resumes_to_the_same_end(tiny_reference, tmp_path,
                                                                                         capsys):
  """With K=2 sharded over the two processes (--cluster_axis=2): each holds one cluster's model."""
  log, reference = tiny_reference
  args = train_args(log, tmp_path / "run", "--cluster_axis=2")
  stopped = hetlm_process([*args, "--inject=sigterm@5"], processes=2, devices=2)
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert stopped.stdout.count("The same command resumes") == 1, stopped.stdout
  assert "stopped at step 8 of hetlm" in stopped.stdout  # the hosts agree at the end of the pass, after step 8
  assert not (tmp_path / "run" / "eval.json").exists()
  assert cli(["hetlm", *args]) == 0  # one process with four devices takes over the two processes' checkpoint
  capsys.readouterr()
  assert_same_result(reference, tmp_path / "run")
