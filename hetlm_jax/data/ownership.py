"""Which process of a job owns a user: a stable hash of the user id, not the position of its rows in a file.

`user_hash` is 64-bit FNV-1a over the UTF-8 bytes of the id as the normalised table holds it (an integer id as
its decimal text), computed with numpy over Arrow's buffers: the same value on every machine, numpy and Python
version, and for any cut of the input into parts, row groups or batches. Process p of P owns the users whose
hash is p modulo P.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def user_hash(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
  """[N] uint64 FNV-1a hashes of the ids (strings; nulls hash as the empty string)."""
  ids = ids.cast(pa.large_string())
  if isinstance(ids, pa.ChunkedArray):
    ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.large_string())
  n = len(ids)
  offsets = np.frombuffer(ids.buffers()[1], np.int64, n + 1, ids.offset * 8)
  data = np.frombuffer(ids.buffers()[2], np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
  start_N, length_N = offsets[:-1], np.diff(offsets)
  if ids.null_count:
    length_N = np.where(ids.is_null().to_numpy(zero_copy_only=False), 0, length_N)
  # Longest first, so the ids still being hashed at byte j are a prefix: O(total bytes), not O(N x longest).
  order_N = np.argsort(-length_N, kind="stable")
  start_N, length_N = start_N[order_N], length_N[order_N]
  hash_N = np.full(n, _FNV_OFFSET, np.uint64)
  longest = int(length_N[0]) if n else 0
  with np.errstate(over="ignore"):
    for j in range(longest):
      active = int(np.searchsorted(-length_N, -j, side="left"))  # the ids longer than j bytes
      byte_N = data[start_N[:active] + j].astype(np.uint64)
      hash_N[:active] = (hash_N[:active] ^ byte_N) * _FNV_PRIME
  out_N = np.empty(n, np.uint64)
  out_N[order_N] = hash_N
  return out_N


def owners(ids: pa.Array | pa.ChunkedArray, processes: int) -> np.ndarray:
  """[N] the process (0..processes-1) that owns each id's user."""
  return (user_hash(ids) % np.uint64(processes)).astype(np.int64)


def owned_rows(table: pa.Table, process: int, processes: int) -> pa.Table:
  """The rows of `table` (a normalised event table) whose users process `process` of `processes` owns."""
  if processes <= 1:
    return table
  return table.filter(pa.array(owners(table["user_id"], processes) == process))
