"""data/buckets.py: a log in any order into bucket files by user hash, and back grouped by user, in bounded memory."""

import numpy as np
import pyarrow as pa
import pytest

from hetlm_jax.data.buckets import BucketWriter, bucket_count, bucket_of, grouped_chunks, read_bucket, sort_by_user
from hetlm_jax.data.ownership import user_hash
from hetlm_jax.errors import HetlmError


def _interleaved(n_users: int = 300, events: int = 6000, seed: int = 0) -> pa.Table:
  rng = np.random.default_rng(seed)
  user_N = rng.integers(0, n_users, events)
  return pa.table(
    {
      "user_id": pa.array([f"u{u}" for u in user_N]),
      "timestamp": pa.array(np.arange(events, dtype=np.int64)),  # the input order, to check it is kept
      "page": pa.array([f"/p/{p}" for p in rng.integers(0, 20, events)]),
    }
  )


def test_each_user_lands_in_one_bucket_in_input_order_and_a_process_keeps_only_its_own(tmp_path):
  table = _interleaved()
  buckets, keep_B = 5, np.arange(5) % 2 == 1  # process 1 of 2
  writer = BucketWriter(tmp_path, buckets, keep_B, buffer_bytes=20_000)  # many flushes: many row groups
  for start in range(0, table.num_rows, 700):
    writer.add(table.slice(start, 700))
  written = writer.close()
  bucket_N = bucket_of(table, buckets)
  np.testing.assert_array_equal(written.rows_B, np.where(keep_B, np.bincount(bucket_N, minlength=buckets), 0))
  assert bucket_N.tolist() == (user_hash(table["user_id"]) % np.uint64(buckets)).astype(int).tolist()
  seen = []
  for b in range(buckets):
    got = read_bucket(tmp_path, b)
    if not keep_B[b]:
      assert got is None
      continue
    expected = table.filter(pa.array(bucket_N == b))
    assert got.num_rows == expected.num_rows
    ids = got["user_id"].to_pylist()
    assert ids == sorted(ids)  # grouped, ids in order
    for user in set(ids):  # each user's events in their input order, all of them
      mine = got.filter(pa.compute.equal(got["user_id"], user))["timestamp"].to_pylist()
      assert mine == expected.filter(pa.compute.equal(expected["user_id"], user))["timestamp"].to_pylist()
    seen += list(set(ids))
  assert len(seen) == len(set(seen))  # no user in two buckets


def test_chunks_hold_whole_users_and_a_user_seen_again_is_one_error():
  table = sort_by_user(_interleaved(n_users=50, events=800))
  pieces = [table.slice(s, 90) for s in range(0, table.num_rows, 90)]  # users cut across pieces
  chunks = list(grouped_chunks(pieces, 7, "log"))
  users = [c["user_id"].unique().to_pylist() for c in chunks]
  assert [len(u) for u in users] == [7] * 7 + [1]
  assert sum(users, []) == sorted(set(table["user_id"].to_pylist()))
  with pytest.raises(HetlmError, match="log: the events of user 'u0' are not together"):
    list(grouped_chunks([table, table.slice(0, 3)], 7, "log"))
  assert len(list(grouped_chunks([table, table.slice(0, 3)], 7, "log", checked=False))) == 8  # u0 joins the last


def test_the_bucket_count_fits_a_bucket_and_its_sorted_copy_in_the_budget():
  assert bucket_count(1000, 100.0, 10**9) == 1
  assert bucket_count(10**6, 100.0, 10 * 2**20) == 20  # 2 x 95.4 MiB / 10 MiB, rounded up
