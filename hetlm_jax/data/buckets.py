"""A log in any order, grouped by user in bounded memory: events go into B bucket files by the stable hash of their
user id (data/ownership.py, the sharded data path's), so each user's events land in one bucket, in input order;
then one bucket at a time is read back, sorted by user (stably: a user's events keep their order) and cut into
chunks of whole users.

B is chosen so that a bucket, and the sorted copy made of it, fit the memory budget: B = ceil(2 x events x bytes
per event in memory / budget), the bytes per event measured on the first piece read. Buckets average half the
budget; the hash spreads users unevenly over buckets of few users, and one user's events are never split, so a
bucket can exceed its share when a few users hold much of the log (the largest is reported). Writing holds at
most half the budget of rows before it appends them to the buckets' files (one Parquet writer per bucket, a row
group per flush), so both passes stay within the budget plus the pieces being read.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetlm_jax.data.ownership import user_hash
from hetlm_jax.errors import HetlmError


def bucket_count(events: int, bytes_per_event: float, memory_bytes: int) -> int:
  """Buckets needed so one bucket and its sorted copy fit in `memory_bytes` (at least 1)."""
  return max(1, int(np.ceil(2 * events * bytes_per_event / max(memory_bytes, 1))))


def bucket_of(table: pa.Table, buckets: int) -> np.ndarray:
  """[N] the bucket (0..buckets-1) of each event's user."""
  return (user_hash(table["user_id"]) % np.uint64(buckets)).astype(np.int64)


def bucket_path(folder: Path, bucket: int) -> Path:
  return folder / f"bucket-{bucket:05d}.parquet"


@dataclasses.dataclass
class Written:
  """What `BucketWriter.close` reports: events and in-memory bytes per bucket (0 for another process's)."""

  rows_B: np.ndarray
  bytes_B: np.ndarray


class BucketWriter:
  """Appends event tables to B bucket files in `folder`, keeping only the buckets `keep_B` marks (a process of
  several keeps its own). Rows wait in memory until `buffer_bytes` of them are held, then go out as one row group
  per bucket."""

  def __init__(self, folder: Path, buckets: int, keep_B: np.ndarray, buffer_bytes: int):
    self.folder, self.buckets, self.keep_B, self.buffer_bytes = folder, buckets, keep_B, buffer_bytes
    _enough_open_files(int(keep_B.sum()), buckets)
    self.rows_B, self.bytes_B = np.zeros(buckets, np.int64), np.zeros(buckets, np.int64)
    self._pending: dict[int, list[pa.Table]] = {}
    self._held = 0
    self._writers: dict[int, pq.ParquetWriter] = {}

  def add(self, table: pa.Table) -> None:
    bucket_N = bucket_of(table, self.buckets)
    kept_N = self.keep_B[bucket_N]
    order = np.flatnonzero(kept_N)[np.argsort(bucket_N[kept_N], kind="stable")]  # by bucket, in input order
    if not len(order):
      return
    ordered = table.take(pa.array(order))
    bucket_R = bucket_N[order]
    starts = np.flatnonzero(np.r_[True, bucket_R[1:] != bucket_R[:-1]])
    ends = np.r_[starts[1:], len(bucket_R)]
    per_row = ordered.nbytes / max(ordered.num_rows, 1)
    for start, end in zip(starts, ends):
      b = int(bucket_R[start])
      self._pending.setdefault(b, []).append(ordered.slice(start, end - start))
      self.rows_B[b] += end - start
      self.bytes_B[b] += int((end - start) * per_row)
    self._held += ordered.nbytes
    if self._held >= self.buffer_bytes:
      self.flush()

  def flush(self) -> None:
    for b, pieces in self._pending.items():
      if b not in self._writers:
        self._writers[b] = pq.ParquetWriter(bucket_path(self.folder, b), pieces[0].schema)
      self._writers[b].write_table(pa.concat_tables(pieces))
    self._pending, self._held = {}, 0

  def close(self, flush: bool = True) -> Written:
    """Writes what waits (unless `flush` is False: abandoning the files) and closes every bucket's file."""
    try:
      if flush:
        self.flush()
    finally:
      for writer in self._writers.values():
        writer.close()
      self._writers = {}
    return Written(self.rows_B, self.bytes_B)


def _enough_open_files(kept: int, buckets: int) -> None:
  """Every kept bucket's writer stays open: raise the soft limit on open files to the hard one if needed, and
  refuse in one line where even that is too few."""
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  need = kept + 256  # the process's own files, sockets and libraries besides
  if need <= soft:
    return
  if hard == resource.RLIM_INFINITY or need <= hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else hard, hard))
    return
  raise HetlmError(
    f"{buckets:,} buckets need {need:,} open files and this system allows {hard:,}: give a larger --memory_mb "
    "(fewer, larger buckets) or run more processes (each keeps its own buckets)"
  )


def read_bucket(folder: Path, bucket: int) -> pa.Table | None:
  """The bucket's events sorted by user (a user's events in input order), or None when it has none."""
  path = bucket_path(folder, bucket)
  if not path.exists():
    return None
  return sort_by_user(pq.read_table(path))


def sort_by_user(table: pa.Table) -> pa.Table:
  """The events grouped by user (ids in ascending order), each user's events in their order in `table` (Arrow's
  sort is stable)."""
  return table.take(pc.sort_indices(table, [("user_id", "ascending")]))


def grouped_chunks(tables: Iterable[pa.Table], chunk_users: int, name: str, checked: bool = True) -> Iterator[pa.Table]:
  """Tables of `chunk_users` whole users each (the last may have fewer), from tables in which each user's events are
  together (a log sorted or grouped by user). `checked`: a user seen again after their chunk was cut is one error
  line naming `name` (the check keeps a hash of every user seen; tables sorted here need none)."""
  pending, done = None, set()

  def check(chunk: pa.Table) -> pa.Table:
    if not checked:
      return chunk
    ids = pc.unique(chunk["user_id"]).to_pylist()
    hashes = {hash(x) for x in ids}
    if not done.isdisjoint(hashes):
      again = next(x for x in ids if hash(x) in done)
      raise HetlmError(
        f"{name}: the events of user {again!r} are not together (seen again after other users): --grouped "
        "streams users in file order, so group the log by user_id (e.g. sort it by user_id, timestamp), or leave "
        "--grouped out to have it grouped first"
      )
    done.update(hashes)
    return chunk

  for table in tables:
    pending = table if pending is None else pa.concat_tables([pending, table])
    ids = pending["user_id"]
    n = pending.num_rows
    starts = np.flatnonzero(pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)) + 1
    # Every chunk_users-th user's first row cuts; the last user may go on in the next piece, so never after it.
    cuts = starts[chunk_users - 1 :: chunk_users]
    begin = 0
    for cut in cuts:
      yield check(pending.slice(begin, cut - begin))
      begin = int(cut)
    pending = pending.slice(begin)
  if pending is not None and pending.num_rows:
    yield check(pending)
