"""Two processes on localhost (jax.distributed, CPU collectives, two devices each) against one process with four."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from synthetic import markov_events
from tiny_run import REPO, assert_readable_as, assert_same_result, hetlm_process, train_args

from hetlm_jax.data.ownership import owners
from hetlm_jax.main import cli


def test_two_processes_train_and_evaluate_as_one_process_with_four_devices_and_only_process_0_writes(
  tiny_reference, tmp_path
):
  log, reference = tiny_reference
  done = hetlm_process(train_args(log, tmp_path / "two"), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_result(reference, tmp_path / "two")
  assert done.stdout.count("report: ") == 1  # the summary comes from process 0 alone
  # Written once: as many records as the one-process run, and the same files.
  lines = lambda d: [json.loads(line)["kind"] for line in (d / "metrics.jsonl").read_text().splitlines()]
  assert lines(tmp_path / "two") == lines(reference)
  # the assignment as a part per process (each its own users) and a manifest, not one file gathered to process 0
  names = lambda d: sorted(p.name.replace("assignments.parquet", "assignments") for p in d.iterdir())
  assert names(tmp_path / "two") == names(reference) and (tmp_path / "two" / "assignments").is_dir()
  manifest = json.loads((tmp_path / "two" / "assignments" / "manifest.json").read_text())
  assert sorted(p.name for p in (tmp_path / "two" / "assignments").iterdir()) == sorted(
    [*manifest["parts"], "manifest.json"]
  )
  parts = [pq.read_table(tmp_path / "two" / "assignments" / name)["user_id"] for name in manifest["parts"]]
  assert [set(owners(ids, 2)) for ids in parts] == [{0}, {1}]  # each process wrote its own users, no stale part
  assert "assignments/ and checkpoints/" in done.stdout
  # the Predictor reads the parts: every training user keeps the one-process run's cluster; `hetlm evaluate` as two
  # processes writes the same evaluation again (with the training's provenance)
  assert_readable_as(reference, tmp_path / "two")
  # SIGTERM to process 1 alone during that evaluation: both stop at the same safe point, exit 0, write nothing.
  written = {name: (tmp_path / "two" / name).read_bytes() for name in ("eval.json", "report.md")}
  evaluate = ["evaluate", f"--workdir={tmp_path / 'two'}"]
  stopped = _two_processes(evaluate, [*evaluate, "--inject=sigterm@evaluate"])
  assert [run.returncode for run in stopped] == [0, 0], stopped[0].stderr[-3000:] + stopped[1].stderr[-3000:]
  assert (
    "SIGTERM (another process): stopped evaluating, after hetlm; eval.json and report.md are as they were"
    in stopped[0].stdout
  ), stopped[0].stdout
  assert "stopped" not in stopped[1].stdout  # process 0 speaks for the job
  assert {name: (tmp_path / "two" / name).read_bytes() for name in written} == written
  assert_same_result(reference, tmp_path / "two")


def test_sigterm_stops_both_processes_at_one_step_and_one_process_resumes_to_the_same_end(
  tiny_reference, tmp_path, capsys
):
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
  for flags in (
    ["--num_processes=2"],
    ["--coordinator_address=localhost:1234"],
    ["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"],
  ):
    assert cli(["hetlm", "train", f"--workdir={tmp_path / 'run'}", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multi-process run needs all three" in err[0], err
  assert not (tmp_path / "run").exists()


def test_slurm_and_tpu_vm_launches_are_detected_and_a_plain_process_is_not(monkeypatch):
  from hetlm_jax import hosts

  for name in ("SLURM_STEP_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(hosts, "_tpu_chips", lambda: 0)
  assert hosts.cluster_environment() is None
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert hosts.cluster_environment() is None  # srun with one task: a single process
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert hosts.cluster_environment() == "slurm"
  monkeypatch.delenv("SLURM_STEP_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")  # not what decides: JAX's own detection does
  assert hosts.cluster_environment() is None
  monkeypatch.setattr(hosts, "_tpu_chips", lambda: 4)  # a TPU VM's chips, as JAX finds them
  assert hosts.cluster_environment() == "tpu"


def _slurm_task(node: int, local: int, tasks_per_node: int, visible: str) -> dict:
  """srun's variables for one task of a job on 2 nodes of 8 GPUs (gpu001, gpu002)."""
  return {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_NTASKS": str(2 * tasks_per_node),
    "SLURM_NODEID": str(node),
    "SLURM_PROCID": str(node * tasks_per_node + local),
    "SLURM_LOCALID": str(local),
    "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
    "SLURM_GPUS_ON_NODE": "8",
    "CUDA_VISIBLE_DEVICES": visible,
  }


def test_on_2_slurm_nodes_of_8_gpus_each_process_claims_the_gpus_of_its_node_and_jax_finds_the_rest(monkeypatch):
  """launch/slurm.sbatch starts one task per node: hosts.initialize hands jax.distributed.initialize all 8 GPUs
  (JAX alone would give each task GPU SLURM_LOCALID, one of eight), and JAX's own SLURM detection gives the
  coordinator (the first node), the process count and each index. No GPU needed: the call is captured."""
  from jax._src import clusters  # what jax.distributed.initialize does with the arguments it is given

  from hetlm_jax import hosts

  def claims(env: dict) -> tuple:
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_L"))})
    os.environ.update(env)
    called = {}
    monkeypatch.setattr(hosts.jax.distributed, "initialize", lambda *a, **kw: called.update(args=a, kwargs=kw))
    monkeypatch.setattr(hosts.jax, "process_index", lambda: 0)
    hosts.initialize()
    assert called["args"] == ()
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, called["kwargs"].get("local_device_ids"), None, None
    )

  port = str(4242 % 2**12 + 65535 - 2**12 + 1)
  all_eight = "0,1,2,3,4,5,6,7"
  for node in (0, 1):  # the sbatch script: one process per node, owning its 8 GPUs
    assert claims(_slurm_task(node, 0, 1, all_eight)) == (f"gpu001:{port}", 2, node, list(range(8)))
  # Without CUDA_VISIBLE_DEVICES the count comes from SLURM_GPUS_ON_NODE.
  assert claims({**_slurm_task(1, 0, 1, ""), "CUDA_VISIBLE_DEVICES": ""})[3] == list(range(8))
  # One process per GPU: a task bound to its GPU (--gpus-per-task=1) sees it as device 0; one that sees all eight
  # takes its local index.
  assert claims(_slurm_task(1, 5, 8, "5")) == (f"gpu001:{port}", 16, 13, [0])
  assert claims(_slurm_task(1, 5, 8, all_eight)) == (f"gpu001:{port}", 16, 13, [5])


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
  runs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "hetlm_jax.main",
        *args,
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, args in enumerate(args_of_process)
  ]
  outputs = [run.communicate(timeout=300) for run in runs]
  return [subprocess.CompletedProcess(run.args, run.returncode, *out) for run, out in zip(runs, outputs)]


def test_the_slurm_script_requeues_a_job_that_hetlm_stopped_and_not_one_that_finished_or_failed(tmp_path):
  """launch/slurm.sbatch with stand-ins for srun (the program as it ends: stopped, finished or failed) and
  scontrol (which records its arguments)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(
    "#!/usr/bin/env bash\n"  # hetlm writes the marker when a signal stopped it
    'case "$OUTCOME" in stopped) echo "SIGTERM: stopped at step 8" > "$HETLM_STOP_MARKER";;'
    " failed) exit 2;; esac\n"
  )
  (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "$@" >> "$CALLS"\n')
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  for outcome, status, calls in (("stopped", 0, "requeue 4242\n"), ("finished", 0, ""), ("failed", 2, "")):
    record = tmp_path / f"{outcome}.calls"
    record.touch()
    env = {
      **os.environ,
      "PATH": f"{bin_dir}:{os.environ['PATH']}",
      "SLURM_JOB_ID": "4242",
      "SLURM_SUBMIT_DIR": str(tmp_path),
      "OUTCOME": outcome,
      "CALLS": str(record),
    }
    done = subprocess.run(
      ["bash", str(REPO / "launch" / "slurm.sbatch"), "--workdir=runs/x"],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert done.returncode == status and record.read_text() == calls, (outcome, done.stdout, done.stderr)
    assert not (tmp_path / "hetlm-4242.stopped").exists()


def test_each_process_scores_and_embeds_its_own_share_of_the_users_and_every_process_ends_with_all_of_them(tmp_path):
  """2 processes x 2 devices: each lays out and scores half of the users on its own rows of every scoring batch (one
  half needs more batches than the other), then both hold every user's sums, as one process with 4 devices does."""
  script = [sys.executable, str(REPO / "tests" / "score_in_processes.py")]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
  for out, command in (
    ("one", script),
    ("two", [str(REPO / "launch" / "local.sh"), "2", "2", *script]),
  ):
    run_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"} if out == "one" else env
    done = subprocess.run(
      [*command, str(tmp_path / out)], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
  one = np.load(tmp_path / "one" / "process0.npz")
  two = [np.load(tmp_path / "two" / f"process{p}.npz") for p in range(2)]
  assert one["share"].tolist() == [0, 1] and len(one["laid_out"]) == 150
  assert [run["share"].tolist() for run in two] == [[0, 2], [1, 2]]
  assert [run["laid_out"].tolist() for run in two] == [list(range(75)), list(range(75, 150))]
  for run in two:
    for key in ("tokens", "target_tokens"):
      np.testing.assert_array_equal(run[key], one[key])
    for key in ("history", "target", "embedding"):
      np.testing.assert_allclose(run[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert one["tokens"][:60].min() > 0 and one["target_tokens"].min() > 0  # something was scored for each
  for run in two:  # k-means fitted on 40 users drawn by their ids, every user labelled by its own process group
    np.testing.assert_array_equal(run["kmeans"], one["kmeans"])
  assert sorted(set(one["kmeans"].tolist())) == [0, 1, 2]
  ranked = [key for key in one.files if key.startswith("ranking_")]
  assert len(ranked) == 8 and not np.isnan(one["ranking_hr@10"]).any()  # every user ranked, by each process
  for run in two:  # each process ranked its own rows of every batch; every user's metrics reached both
    for key in ranked:
      np.testing.assert_array_equal(run[key], one[key], err_msg=key)


def test_with_data_shards_each_process_trains_on_its_shards_rows_and_the_run_resumes_on_one_process_to_the_same_end(
  tiny_reference, tmp_path, capsys
):
  """--data_shards=2 on 2 processes x 2 devices: each process's rows of every batch come from its own shard's users;
  stopped by SIGTERM and resumed by one process with 4 devices, it ends as the one-process run with those shards."""
  log, reference = tiny_reference
  one = hetlm_process(train_args(log, tmp_path / "one", "--data_shards=2"))
  assert one.returncode == 0, one.stderr[-3000:]
  losses = lambda d: [json.loads(line).get("loss") for line in (d / "metrics.jsonl").read_text().splitlines()]
  assert losses(tmp_path / "one") != losses(reference)  # other batches than with every row from all users
  args = train_args(log, tmp_path / "two", "--data_shards=2")
  stopped = hetlm_process([*args, "--inject=sigterm@5"], processes=2, devices=2)
  assert stopped.returncode == 0 and "The same command resumes" in stopped.stdout, stopped.stderr[-3000:]
  assert not (tmp_path / "two" / "eval.json").exists()
  assert cli(["hetlm", *args]) == 0
  capsys.readouterr()
  assert_same_result(tmp_path / "one", tmp_path / "two")
