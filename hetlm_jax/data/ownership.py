"""Which process of a job owns a user: a stable hash of the user id, not the position of its rows in a file.

`user_hash` is 64-bit FNV-1a over the UTF-8 bytes of the id as the normalised table holds it (an integer id as
its decimal text), computed with numpy over Arrow's buffers: the same value on every machine, numpy and Python
version, and for any cut of the input into parts, row groups or batches. Process p of P owns the users whose
hash is p modulo P. `user_keys` mixes that hash with seeds into a key that orders users at random (--split=hash):
a user's key is its id's alone, so any process can compute it for its users whatever P and the log's order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hetlm_jax import hosts

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


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: every bit of the output depends on every bit of the input."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def user_keys(ids: pa.Array | pa.ChunkedArray, *seeds: int) -> np.ndarray:
  """[N] uint64 keys of the ids under `seeds`: the ids' hash mixed with each seed in turn. Sorting users by key is
  a seeded random order of them that needs no other user."""
  x = user_hash(ids)
  with np.errstate(over="ignore"):
    for seed in seeds:
      x = _mix(x + np.uint64(seed % 2**64) * _GAMMA + _GAMMA)
  return x


def key_streams(keys: np.ndarray, n: int, tag: int = 0) -> np.ndarray:
  """[N, n] uint64 random numbers from each of `keys` (`user_keys`) and `tag`: a user's draws depend on its id and
  the seeds alone, never on the other users or on how they are cut among processes."""
  counter = np.uint64(tag % 2**32) * np.uint64(n) + np.arange(1, n + 1, dtype=np.uint64)
  with np.errstate(over="ignore"):
    return _mix(_mix(np.asarray(keys, np.uint64)[:, None] + counter[None, :] * _GAMMA))


def uniform(bits: np.ndarray) -> np.ndarray:
  """Floats in [0, 1) from uint64 random numbers (their top 53 bits)."""
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def user_uniform(ids: pa.Array | pa.ChunkedArray, *seeds: int) -> np.ndarray:
  """[N] float64 in [0, 1): the top 53 bits of `user_keys`, a seeded uniform draw per user."""
  return uniform(user_keys(ids, *seeds))


def smallest_keys(keys: np.ndarray, n: int) -> np.ndarray:
  """The n smallest of `keys` (`user_keys`, one a user), sorted: of every process's users with --own_users (each
  sends its own n smallest; every process must call this at the same point), else of these. A seeded draw of n users
  is then the users whose key is at most the last of them, whatever the number of processes."""
  (smallest,) = hosts.every_user(np.sort(keys)[:n])
  return np.sort(smallest)[:n]


def owners(ids: pa.Array | pa.ChunkedArray, processes: int) -> np.ndarray:
  """[N] the process (0..processes-1) that owns each id's user."""
  return (user_hash(ids) % np.uint64(processes)).astype(np.int64)


def owned_rows(table: pa.Table, process: int, processes: int) -> pa.Table:
  """The rows of `table` (a normalised event table) whose users process `process` of `processes` owns."""
  if processes <= 1:
    return table
  return table.filter(pa.array(owners(table["user_id"], processes) == process))
