"""A run's whole life on an object store: train, stop, resume, evaluate, predict and load with --workdir=s3://...
and --data=s3://..., against moto's S3 server on 127.0.0.1 (conftest.s3_endpoint), end as the same run on a local
disk; one writer per URI workdir (a lock object), a stale lock is taken over; files are written whole or not at
all. Nothing leaves the machine."""

import json
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pyarrow.parquet as pq
import pytest
from etils import epath
from tiny_run import assert_same_result, hetlm_process, train_args

from hetlm_jax.errors import HetlmError
from hetlm_jax.files import location, replace_text, written
from hetlm_jax.lock import LOCK_FILE, ObjectLock
from hetlm_jax.main import cli
from hetlm_jax.train.checkpoint import orbax_on_s3
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.workdir import read_assignments


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
  """s3://runs, with the tiny run's log as two parts under s3://runs/events/."""
  import s3fs

  fs = s3fs.S3FileSystem(use_listings_cache=False)  # it sees what the runs write
  fs.mkdir("runs")
  return fs


def upload_log(fs, log, prefix: str) -> str:
  table = pq.read_table(log)
  half = table.num_rows // 2
  for i, piece in enumerate((table.slice(0, half), table.slice(half))):
    with fs.open(f"{prefix}/part-{i}.parquet", "wb") as f:
      pq.write_table(piece, f)
  return f"s3://{prefix}/"


def _params(restored) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(restored["state"]["params"])])


def test_a_run_on_s3_trains_stops_resumes_evaluates_predicts_and_loads_as_on_a_local_disk(
  tiny_reference, bucket, tmp_path, capsys
):
  from hetlm_jax import Predictor

  log, reference = tiny_reference
  data = upload_log(bucket, log, "runs/events")
  run = "s3://runs/tiny"
  args = train_args(data, run, "--tensorboard")
  assert cli(["hetlm", *args, "--inject=sigterm@5"]) == 0
  out = capsys.readouterr().out
  assert "SIGTERM: stopped at step 5 of hetlm" in out and f"--workdir={run}" in out.strip().splitlines()[-1]
  manager = ocp.CheckpointManager(epath.Path(f"{run}/checkpoints/hetlm"))
  assert manager.latest_step() == 5
  assert not bucket.exists("runs/tiny/eval.json") and not bucket.exists(f"runs/tiny/{LOCK_FILE}")
  stopped = [json.loads(line) for line in bucket.cat_file("runs/tiny/metrics.jsonl").decode().splitlines()]
  assert [r["kind"] for r in stopped] == ["start"]

  assert cli(["hetlm", *args]) == 0
  assert f"report: {run}/report.md" in capsys.readouterr().out
  assert_same_result(reference, location(run), unlike=("data",))
  assert bucket.exists("runs/tiny/report.md") and bucket.exists("runs/tiny/nll_per_user.png")
  assert bucket.find("runs/tiny/tensorboard/hetlm"), "tensorboardX wrote no event file to the bucket"
  records = [json.loads(line) for line in bucket.cat_file("runs/tiny/metrics.jsonl").decode().splitlines()]
  assert records[-1]["kind"] == "eval" and sum(r["kind"] == "start" for r in records) == 2

  # hetlm evaluate rewrites eval.json on the bucket, with the same figures
  before = json.loads(bucket.cat_file("runs/tiny/eval.json"))
  assert cli(["hetlm", "evaluate", f"--workdir={run}"]) == 0
  capsys.readouterr()
  again = json.loads(bucket.cat_file("runs/tiny/eval.json"))
  assert again["models"]["hetlm"]["nll"] == pytest.approx(before["models"]["hetlm"]["nll"])

  # the Predictor loads from the URI, and hetlm predict reads and writes there: the same rows as locally
  table = read_assignments(reference)
  users = table["user_id"].to_numpy(zero_copy_only=False)
  routing = Predictor.load(run).assign([["/p/2"] for _ in users], user_ids=users)
  assert routing.saved.all() and (routing.cluster == table["cluster"].to_numpy()).all()
  assert cli(["hetlm", "generate", f"--workdir={run}", f"--user={users[0]}"]) == 0
  # plain orbax reads the checkpoint from the URI too (README: orbax_on_s3 for s3://), as saved locally
  orbax_on_s3()
  manager = ocp.CheckpointManager(epath.Path(f"{run}/checkpoints/hetlm"))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  local = ocp.CheckpointManager((reference / "checkpoints" / "hetlm").absolute())
  expected = local.restore(local.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  np.testing.assert_allclose(_params(restored), _params(expected), rtol=1e-5)
  assert cli(["hetlm", "predict", f"--workdir={run}", f"--data={data}", "--out=s3://runs/predictions.parquet"]) == 0
  assert cli(["hetlm", "predict", f"--workdir={reference}", f"--data={log}", f"--out={tmp_path / 'p.parquet'}"]) == 0
  capsys.readouterr()
  with bucket.open("runs/predictions.parquet", "rb") as f:
    remote = pq.read_table(f).sort_by("user_id")
  assert remote.equals(pq.read_table(tmp_path / "p.parquet").sort_by("user_id"))


def test_two_processes_that_share_no_disk_train_one_run_in_the_bucket_as_one_process_does(tiny_reference, bucket):
  """launch/local.sh: 2 processes x 2 CPU devices write prepared/ and assignments/ parts, orbax's per-process
  checkpoint data and process 0's files to one s3:// workdir."""
  log, reference = tiny_reference
  data = upload_log(bucket, log, "runs/events3")
  done = hetlm_process(train_args(data, "s3://runs/two"), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.count("report: s3://runs/two/report.md") == 1
  assert len(json.loads(bucket.cat_file("runs/two/assignments/manifest.json"))["parts"]) == 2
  assert_same_result(reference, location("s3://runs/two"), unlike=("data",))


def test_a_second_run_on_an_s3_workdir_is_refused_and_a_stale_lock_is_taken_over(
  tiny_reference, bucket, monkeypatch, capsys
):
  log, _ = tiny_reference
  data = upload_log(bucket, log, "runs/events2")
  workdir = location("s3://runs/locked")
  holder = ObjectLock(workdir, "train")
  with holder:  # another run holds it: refused in one line, nothing written
    assert cli(["hetlm", *train_args(data, "s3://runs/locked")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run is writing there (hetlm train, pid" in err[0], err
    assert bucket.find("runs/locked") == [f"runs/locked/{LOCK_FILE}"]
    with pytest.raises(HetlmError, match="another run is writing there"):
      ObjectLock(workdir, "evaluate").__enter__()
  assert not bucket.exists(f"runs/locked/{LOCK_FILE}")  # released by its holder

  # a holder killed without releasing it: its lock is taken over once not rewritten for HETLM_LOCK_STALE_S
  bucket.pipe_file(f"runs/locked/{LOCK_FILE}", b'{"pid": 1, "host": "gone", "command": "train", "since": "then"}\n')
  with pytest.raises(HetlmError, match="pid 1 on gone"):
    ObjectLock(workdir, "train").__enter__()
  # (the store's times are whole seconds: a live lock, rewritten every 0.3 s, can look up to 1.3 s old)
  monkeypatch.setenv("HETLM_LOCK_STALE_S", "2.5")
  monkeypatch.setenv("HETLM_LOCK_HEARTBEAT_S", "0.3")
  time.sleep(3)
  with ObjectLock(workdir, "train"):
    first = bucket.modified(f"runs/locked/{LOCK_FILE}")
    time.sleep(1.5)  # the heartbeat rewrites it, so it never looks stale while its run goes on
    assert bucket.modified(f"runs/locked/{LOCK_FILE}") > first
    with pytest.raises(HetlmError, match=f"pid {os.getpid()} on"):
      ObjectLock(workdir, "evaluate").__enter__()
  assert not bucket.exists(f"runs/locked/{LOCK_FILE}")


def test_metrics_on_s3_are_rewritten_whole_and_what_is_pending_is_written_on_close(bucket):
  lines = lambda: bucket.cat_file("runs/m/metrics.jsonl").decode().splitlines()
  log = MetricsLog("s3://runs/m/metrics.jsonl")
  log.write({"kind": "start"})
  assert lines() == ['{"kind": "start"}']
  log.write({"kind": "train", "step": 1})  # a train record waits for REWRITE_S or the next other record
  assert len(lines()) == 1
  log.close()  # (a run's end and a stop both close it)
  assert lines() == ['{"kind": "start"}', '{"kind": "train", "step": 1}']
  again = MetricsLog("s3://runs/m/metrics.jsonl")  # a resumed run goes on after the earlier records
  again.write({"kind": "validation", "nll": 1.0})
  assert len(lines()) == 3 and [r["kind"] for r in again.records("train")] == ["train"]


def test_an_output_on_s3_is_written_whole_or_not_at_all(bucket):
  target = "s3://runs/whole/eval.json"
  replace_text(target, "old\n")
  with pytest.raises(RuntimeError), written(target) as tmp:
    tmp.write_text("half of the new")
    raise RuntimeError("stopped while writing")
  assert bucket.cat_file("runs/whole/eval.json") == b"old\n"
  replace_text(target, "new\n")
  assert bucket.cat_file("runs/whole/eval.json") == b"new\n"
  assert bucket.find("runs/whole") == ["runs/whole/eval.json"]  # no temporary object left


def test_a_uri_workdir_without_its_library_or_bucket_is_one_line(bucket, monkeypatch, capsys, tiny_reference):
  log, _ = tiny_reference
  assert cli(["hetlm", *train_args(log, "s3://no-such-bucket/run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no bucket 'no-such-bucket' there" in err[0], err
  monkeypatch.setitem(sys.modules, "s3fs", None)  # the cloud extra not installed
  with pytest.raises(HetlmError, match=r"needs s3fs: pip install 'hetlm_jax\[cloud\]'"):
    location("s3://runs/x")
  with pytest.raises(HetlmError, match="ftp:// is not a store"):
    location("ftp://host/run")


def test_an_s3_lock_beats_on_through_a_store_error_and_stops_once_another_run_has_it(bucket, monkeypatch):
  monkeypatch.setenv("HETLM_LOCK_HEARTBEAT_S", "0.2")
  key = f"runs/beat/{LOCK_FILE}"
  with ObjectLock(location("s3://runs/beat"), "train") as lock:
    read, errors = lock._fs.cat_file, iter([OSError("503 Slow Down")] * 3)

    def flaky(path, *args, **kwargs):
      error = next(errors, None)
      if error is not None:
        raise error
      return read(path, *args, **kwargs)

    monkeypatch.setattr(lock._fs, "cat_file", flaky)
    first = bucket.modified(key)
    time.sleep(2.2)  # the store's times are in seconds
    assert bucket.modified(key) > first and lock._beat.is_alive()  # it went on beating after the errors
    bucket.pipe_file(key, b'{"pid": 2, "host": "other", "command": "train", "since": "now", "token": "theirs"}\n')
    lock._beat.join(2)
    assert not lock._beat.is_alive()
  assert json.loads(bucket.cat_file(key))["token"] == "theirs"  # another run's lock is left alone
