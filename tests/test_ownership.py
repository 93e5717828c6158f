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
from hetlm_jax.errors import HetlmError


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


def _by_user_parts(root, table, parts=4):
  """A bucketed export: each part file holds whole users (user i in part i mod `parts`)."""
  root.mkdir()
  users = sorted(set(table["user_id"].to_pylist()))
  for i in range(parts):
    mine = pa.array(users[i::parts])
    pq.write_table(table.filter(pa.compute.is_in(table["user_id"], mine)), root / f"part-{i:05d}.parquet")
  return root


def test_with_parts_by_user_a_process_reads_only_its_own_part_files(tmp_path):
  from test_sources import events

  table = events()
  folder = _by_user_parts(tmp_path / "bucketed", table)
  (folder / "part-00001.parquet").write_bytes(b"PAR1 not parquet")  # process 1's: process 0 never opens it
  mine = read_events(folder, share=(0, 2), parts_by_user=True)
  expected = [u for i, u in enumerate(sorted(set(table["user_id"].to_pylist()))) if i % 4 in (0, 2)]
  assert sorted(set(mine["user_id"].to_pylist())) == expected
  with pytest.raises(HetlmError, match="part-00001.parquet"):  # read by hash, every part is opened
    read_events(folder, share=(0, 2))
  with pytest.raises(HetlmError, match="--parts_by_user: 4 part file"):
    read_events(folder, share=(0, 5), parts_by_user=True)


def test_two_processes_on_parts_by_user_train_as_one_process_and_a_user_in_two_parts_is_refused(
  tiny_reference, tmp_path
):
  log, reference = tiny_reference
  table = pq.read_table(log)
  folder = _by_user_parts(tmp_path / "bucketed", table)
  done = hetlm_process(train_args(folder, tmp_path / "two", "--parts_by_user"), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
  assert_same_result(reference, tmp_path / "two", unlike=("data",))
  [record] = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"data"' in x][:1]
  n = len(set(table["user_id"].to_pylist()))
  first = len(range(0, n, 4)) + len(range(2, n, 4))  # parts 0 and 2; process 1 has parts 1 and 3
  assert record["data"]["users_by_process"] == [first, n - first]
  spread = spark_folder(tmp_path / "export", table)  # every user in every part
  done = hetlm_process(train_args(spread, tmp_path / "bad", "--parts_by_user"), processes=2, devices=2)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and "has events in the parts of two processes" in lines[-1], done.stderr[-3000:]
  assert not (tmp_path / "bad" / "prepared").exists()


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
