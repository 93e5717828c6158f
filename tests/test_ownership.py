"""Users belong to processes by a stable hash of their id: FNV-1a's published values, any cut of the input, and a
two-process run on a folder of parts that prepares disjoint halves and ends as one process does."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from test_sources import spark_folder
from tiny_run import assert_same_result, hetlm_process, train_args

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
