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


def test_incomplete_multi_process_flags_are_refused_in_one_line(tmp_path, capsys):
  for flags in (["--num_processes=2"], ["--coordinator_address=localhost:1234"],
                ["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"]):
    assert cli(["hetlm", "train", f"--workdir={tmp_path / 'run'}", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multi-process run needs all three" in err[0], err
  assert not (tmp_path / "run").exists()


def test_slurm_and_tpu_vm_launches_are_detected_and_a_plain_process_is_not(monkeypatch):
  from hetlm_jax.hosts import cluster_environment
  for name in ("SLURM_STEP_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert cluster_environment() is None
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert cluster_environment() is None  # srun with one task: a single process
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert cluster_environment() == "slurm"
  monkeypatch.delenv("SLURM_STEP_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
  assert cluster_environment() == "tpu"
