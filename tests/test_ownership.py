"""Users belong to processes by a stable hash of their id: FNV-1a's published values, any cut of the input, and a
two-process run on a folder of parts that prepares disjoint halves and ends as one process does."""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_sources import spark_folder
from tiny_run import assert_same_result, hetlm_process, train_args

from hetlm_jax.config import Config
from hetlm_jax.data.ownership import owners, user_hash
from hetlm_jax.data.readers import read_events


def test_the_user_hash_is_64_bit_fnv_1a_of_the_ids_text_whatever_the_chunks():
  # Published FNV-1a 64 test vectors (the FNV authors' list): "", "a", "foobar".
  assert user_hash(pa.array(["", "a", "foobar"])).tolist() == [
    0xCBF29CE484222325,
    0xAF63DC4C8601EC8C,
    0x85944171F73967E8,
  ]
  ids = [f"user-{i}" * (i % 5) for i in range(1000)]
  whole = user_hash(pa.array(ids))
  chunked = user_hash(pa.chunked_array([pa.array(ids[:10]), pa.array(ids[10:700]), pa.array(ids[700:])]))
  assert (whole == chunked).all() and (user_hash(pa.array(ids[3:9])) == whole[3:9]).all()
  assert (user_hash(pa.array(ids, pa.large_string())) == whole).all()
  share_P = np.bincount(owners(pa.array([f"u{i}" for i in range(20_000)]), 4), minlength=4)
  assert (abs(share_P - 5_000) < 250).all(), share_P  # about even


def test_each_share_of_a_folder_holds_its_users_every_event_and_no_other(tmp_path):
  from test_sources import events

  folder = spark_folder(tmp_path / "export", events())
  whole = read_events(folder)
  shares = [read_events(folder, share=(p, 3)) for p in range(3)]
  users = [set(t["user_id"].to_pylist()) for t in shares]
  assert all(users) and not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
  assert sum(t.num_rows for t in shares) == whole.num_rows
  keys = [("user_id", "ascending"), ("timestamp", "ascending")]
  assert pa.concat_tables(shares).sort_by(keys).equals(whole.sort_by(keys))


def test_two_processes_prepare_disjoint_users_of_a_folder_and_train_as_one_process_does(tiny_reference, tmp_path):
  log, reference = tiny_reference
  table = pq.read_table(log)
  folder = spark_folder(tmp_path / "export", table)
  done = hetlm_process(train_args(folder, tmp_path / "two"), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
  assert_same_result(reference, tmp_path / "two", unlike=("data",))
  [record] = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"data"' in x][:1]
  expected = np.bincount(owners(pa.array(sorted(set(table["user_id"].to_pylist()))), 2), minlength=2)
  assert record["data"]["users_by_process"] == expected.tolist() and all(expected > 0)


def _prepared_users(workdir):
  """The users of each part file of WORKDIR/prepared."""
  return [
    set(pq.read_table(p, columns=["user_id"])["user_id"].to_pylist())
    for p in sorted((workdir / "prepared").glob("part-*"))
  ]


def test_a_resumed_two_process_run_reads_its_prepared_parts_not_the_log_and_ends_as_an_uninterrupted_one(
  tiny_reference, tmp_path
):
  """SIGTERM in preparation writes nothing; SIGTERM in the first E-step stops both processes after a checkpoint;
  the same command resumes from the prepared parts (the log is gone by then) to the reference's end."""
  log, reference = tiny_reference
  folder = spark_folder(tmp_path / "export", pq.read_table(log))
  args = train_args(folder, tmp_path / "run")
  stopped = hetlm_process([*args, "--inject=sigterm@prepare"], processes=2, devices=2)
  assert stopped.returncode == 0 and "The same command resumes" in stopped.stdout, stopped.stderr[-3000:]
  assert not (tmp_path / "run" / "prepared").exists()
  stopped = hetlm_process([*args, "--inject=sigterm@estep"], processes=2, devices=2)
  assert stopped.returncode == 0 and "The same command resumes" in stopped.stdout, stopped.stderr[-3000:]
  parts = _prepared_users(tmp_path / "run")
  assert len(parts) == 2 and all(parts) and not parts[0] & parts[1]
  assert parts[0] | parts[1] == set(pq.read_table(log)["user_id"].to_pylist())  # disjoint, and together all users
  shutil.rmtree(folder)  # a resumed run reads nothing twice: the prepared users, not the log
  done = hetlm_process(args, processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_result(reference, tmp_path / "run", unlike=("data",))


def test_evaluate_reads_the_prepared_users_and_a_changed_data_path_reads_the_log_again(
  tiny_reference, tmp_path, monkeypatch, capsys
):
  from hetlm_jax.data import prepare
  from hetlm_jax.main import cli
  from hetlm_jax.workdir import read_prepared

  log, reference = tiny_reference
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  read = []
  monkeypatch.setattr(prepare, "read_events", lambda *a, **k: read.append(a) or pytest.fail("read the log"))
  assert cli(["hetlm", "evaluate", f"--workdir={run}"]) == 0
  capsys.readouterr()
  assert not read
  assert_same_result(reference, run)
  cfg = Config.load(run / "config.json")
  assert read_prepared(run, cfg) is not None
  assert read_prepared(run, cfg.replace(data=dataclasses.replace(cfg.data, path=str(tmp_path / "other")))) is None
