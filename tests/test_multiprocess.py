"""Two processes on localhost (jax.distributed, CPU collectives, two devices each) against one process with four."""

import json
import os
import socket
import subprocess
import sys

import pyarrow.parquet as pq

from hetlm_jax.main import cli
from synthetic import markov_events
from tiny_run import REPO, assert_same_result, hetlm_process, train_args


def test_two_processes_train_and_evaluate_as_one_process_with_four_devices_and_only_process_0_writes(tiny_reference, tmp_path):
  log, reference = tiny_reference
  done = hetlm_process(train_args(log, tmp_path / "two"), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_result(reference, tmp_path / "two")
  assert done.stdout.count("report: ") == 1  # the summary comes from process 0 alone
  # Written once: as many records as the one-process run, and the same files.
  lines = lambda d: [json.loads(line)["kind"] for line in (d / "metrics.jsonl").read_text().splitlines()]
  assert lines(tmp_path / "two") == lines(reference)
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in reference.iterdir())
  # `hetlm evaluate` as two processes writes the same evaluation again (with the training's provenance).
  written = (tmp_path / "two" / "eval.json").stat().st_mtime_ns
  again = hetlm_process(["evaluate", f"--workdir={tmp_path / 'two'}"], processes=2, devices=2)
  assert again.returncode == 0 and again.stdout.count("report: ") == 1, again.stderr[-3000:]
  assert (tmp_path / "two" / "eval.json").stat().st_mtime_ns > written
  # SIGTERM to process 1 alone during that evaluation: both stop at the same safe point, exit 0, write nothing.
  written = {name: (tmp_path / "two" / name).read_bytes() for name in ("eval.json", "report.md")}
  evaluate = ["evaluate", f"--workdir={tmp_path / 'two'}"]
  stopped = _two_processes(evaluate, [*evaluate, "--inject=sigterm@evaluate"])
  assert [run.returncode for run in stopped] == [0, 0], stopped[0].stderr[-3000:] + stopped[1].stderr[-3000:]
  assert "SIGTERM (another process): stopped evaluating, after hetlm; eval.json and report.md are as they were" in \
    stopped[0].stdout, stopped[0].stdout
  assert "stopped" not in stopped[1].stdout  # process 0 speaks for the job
  assert {name: (tmp_path / "two" / name).read_bytes() for name in written} == written
  assert_same_result(reference, tmp_path / "two")


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


def test_processes_that_read_different_data_refuse_to_train_in_one_line(tiny_reference, tmp_path):
  log, _ = tiny_reference
  other = tmp_path / "other.parquet"
  pq.write_table(markov_events(n_users=120, n_groups=2, sessions=3, session_len=6, seed=1)[0], other)
  for run in _two_processes(train_args(log, tmp_path / "run"), train_args(other, tmp_path / "run")):
    errors = [line for line in run.stderr.splitlines() if line.startswith("hetlm: error: ")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert "differs between process 0 and process(es) 1" in errors[0]
  assert not (tmp_path / "run").exists()


def _two_processes(*args_of_process) -> list[subprocess.CompletedProcess]:
  """Two processes of one job (two CPU devices each), each with its own command line."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  runs = [subprocess.Popen([sys.executable, "-m", "hetlm_jax.main", *args, f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", f"--process_id={i}"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i, args in enumerate(args_of_process)]
  outputs = [run.communicate(timeout=300) for run in runs]
  return [subprocess.CompletedProcess(run.args, run.returncode, *out) for run, out in zip(runs, outputs)]
