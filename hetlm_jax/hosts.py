"""One process per host: starting jax.distributed, which process writes, and global arrays fed from host rows.

Every process runs the same program on the same data: the same tokenizer, users and batch order (all of
them derive from the data and the seed). Each builds only its own devices' block of a step's global batch
(rows, and clusters when K is sharded over hosts), deterministically; in a scoring pass each group of processes
lays out only its share of the users on its rows and decides what concerns them alone (the E-step moves its own
users, with the clusters' sizes summed over the groups: `Groups`). What every process needs is gathered to every
process (each user's new cluster, a validation or evaluation NLL a user, metrics), so every host makes the same
decisions (early stopping, re-seeding). With --own_users (`own_users`) each process holds only its own users from
preparation on: per-user arrays are then a process's own, and what concerns every user is summed (`total`) or, a
few scalars a user, brought together (`every_user`). Only process 0 writes files other than checkpoints, which
orbax writes collectively.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import jax
import numpy as np
import pyarrow as pa
from absl import logging
from jax.experimental import multihost_utils

from hetlm_jax.errors import HetlmError


def _tpu_chips() -> int:
  """TPU chips on this machine, found as JAX finds them (their PCI ids), before any backend starts."""
  try:
    from jax._src import hardware_utils  # JAX's own detection; private, so a failure means none

    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # any failure: an older or newer JAX without it
    return 0


def cluster_environment() -> str | None:
  """The multi-process launcher this process runs under, if any: 'slurm' (srun with more than one task) or
  'tpu' (a Cloud TPU VM: jax.distributed.initialize() then reads the slice's workers from the TPU metadata, as
  JAX does; a one-host VM is a job of one process)."""
  if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  if _tpu_chips() > 0:
    return "tpu"
  return None


def _tasks_on_this_node(env) -> int:
  """srun's tasks on this node, from SLURM_TASKS_PER_NODE ("8(x2),4": 8 on each of the first two nodes, then
  4) and this node's index SLURM_NODEID."""
  counts = []
  for part in filter(None, env.get("SLURM_TASKS_PER_NODE", "1").split(",")):
    count, _, times = part.partition("(x")
    counts += [int(count)] * int(times.rstrip(")") or 1)
  node = int(env.get("SLURM_NODEID", 0) or 0)
  return counts[min(node, len(counts) - 1)] if counts else 1


def slurm_local_devices(env=None) -> list[int] | None:
  """The GPUs (ordinals among those this task sees) that this process of a SLURM job claims.

  One task per node (launch/slurm.sbatch): all of the node's GPUs, from CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE
  (JAX alone would give it GPU SLURM_LOCALID, i.e. one of eight). Several tasks per node (one per GPU): a task
  that sees one GPU (--gpus-per-task=1) takes it; a task that sees them all takes GPU SLURM_LOCALID. None: JAX's
  own choice (JAX_LOCAL_DEVICE_IDS when set, or no GPU information)."""
  env = os.environ if env is None else env
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if _tasks_on_this_node(env) == 1:
    count = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", 0) or 0)
    return list(range(count)) or None
  if len(visible) == 1:
    return [0]
  return [int(env["SLURM_LOCALID"])] if "SLURM_LOCALID" in env else None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the job's processes when given a coordinator or run by a known launcher; one process needs nothing.
  Must run before anything else touches JAX."""
  explicit = bool(coordinator_address) or num_processes > 1
  if explicit and (not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes):
    raise HetlmError(
      f"--coordinator_address={coordinator_address or '(none)'} --num_processes={num_processes} "
      f"--process_id={process_id}: a multi-process run needs all three, with 0 <= process_id < "
      "num_processes"
    )
  detected = None if explicit else cluster_environment()
  if not explicit and detected is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif detected == "slurm":  # the rest (coordinator, process count and index) from SLURM's variables, by JAX
      jax.distributed.initialize(local_device_ids=slurm_local_devices())
    else:  # a TPU VM: JAX reads the slice from the metadata server
      jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:  # the coordinator cannot be reached, or the launcher's variables are off
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise HetlmError(f"jax.distributed could not start ({detected or coordinator_address}): {first}") from None
  if jax.process_index() > 0:  # one log of the job's progress: the other processes only warn
    logging.set_verbosity(logging.WARNING)
  logging.info(
    "process %d of %d (%s), %d of %d devices here",
    jax.process_index(),
    jax.process_count(),
    detected or "--coordinator_address",
    jax.local_device_count(),
    jax.device_count(),
  )


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, assignments, evaluation, report)."""
  return jax.process_index() == 0


def local_block(sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The part of a global array of `shape` that this process's devices hold under `sharding`: on the meshes
  used here, one contiguous block (rows of the batch, and clusters when K is sharded over hosts)."""
  block = []
  for dim, size in enumerate(shape):
    ranges = [index[dim].indices(size)[:2] for index in sharding.addressable_devices_indices_map(shape).values()]
    block.append(slice(min(r[0] for r in ranges), max(r[1] for r in ranges)))
  return tuple(block)


def put(x, sharding) -> jax.Array:
  """A host array that every process holds whole (same values) → a global array; each process copies only
  its own block to its own devices."""
  x = np.asarray(x)
  block = x if jax.process_count() == 1 else x[local_block(sharding, x.shape)]
  return put_block((block,), sharding, x.shape)[0]


def put_block(xs, sharding, shape: tuple[int, ...]) -> tuple:
  """Global arrays of `shape` from this process's block of each (its `local_block`, built without the rest)."""
  if jax.process_count() == 1:
    return tuple(jax.device_put(x, sharding) for x in xs)
  return tuple(jax.make_array_from_process_local_data(sharding, x, shape) for x in xs)


def put_all(xs, sharding) -> tuple:
  """`put` of each array of `xs`, onto one sharding."""
  return tuple(put(x, sharding) for x in xs)


def fetch_local(x: jax.Array) -> tuple[tuple[slice, ...], np.ndarray]:
  """(block, values): the `local_block` of global array `x` that this process's devices hold, and its values, read
  from its own devices (nothing gathered; with one process, the whole array)."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return tuple(slice(0, n) for n in x.shape), np.asarray(x)
  block = local_block(x.sharding, x.shape)
  values = np.empty(tuple(b.stop - b.start for b in block), x.dtype)
  for shard in x.addressable_shards:
    at = tuple(slice(*(np.array(i.indices(n)[:2]) - b.start)) for i, n, b in zip(shard.index, x.shape, block))
    values[at] = np.asarray(shard.data)
  return block, values


def fetch(tree):
  """Device values as numpy on every process; arrays spread over several hosts are gathered first."""
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())


_OWN_USERS = [False]  # set by data/prepare.py: whether this job's processes hold only their own users


def set_own_users(flag: bool) -> None:
  """Records how the prepared data is laid out: every process holds every user (False), or only the users it owns
  (--own_users: no exchange after preparation)."""
  _OWN_USERS[0] = bool(flag)


def own_users() -> bool:
  """Whether each process of this job holds only its own users (--own_users with several processes): every per-user
  array of a process (sequences, assignment, weights, scores) is then of its users alone, and what concerns all
  users is summed (`total`) or, a scalar a user, brought together (`every_user`)."""
  return _OWN_USERS[0] and jax.process_count() > 1


def total(*arrays: np.ndarray) -> list[np.ndarray]:
  """Each of `arrays` (a sum over this process's users) summed over every process's users: as it is unless each
  process holds only its own users (`own_users`); every process must call this at the same point."""
  if not own_users():
    return [np.asarray(a) for a in arrays]
  every = gather_arrays(*arrays)
  return [np.sum([got[i] for got in every], axis=0) for i in range(len(arrays))]


def every_user(*arrays: np.ndarray) -> list[np.ndarray]:
  """Each of `arrays` (per user, along the first axis) for every user of the job, the processes' users one after
  the other: as it is unless each process holds only its own users (`own_users`). For per-user scalars only
  (statistics over all users); every process must call this at the same point."""
  if not own_users():
    return [np.asarray(a) for a in arrays]
  every = gather_arrays(*arrays)
  return [np.concatenate([got[i] for got in every]) for i in range(len(arrays))]


def share() -> tuple[int, int]:
  """(this process's index, the number of processes): process p of P owns the users data/ownership.py gives it."""
  return jax.process_index(), jax.process_count()


GATHER_PIECE = 16 * 2**20  # bytes each process sends per all-gather: the exchange's buffers stay this small


def gather_bytes(blob: bytes) -> list[bytes | memoryview]:
  """Every process's `blob`, in process order (every process must call this at the same point); sent in pieces of
  GATHER_PIECE bytes, so besides the result only a piece from every process is held at a time."""
  if jax.process_count() == 1:
    return [blob]
  # Sizes as two int32 halves (JAX's default integers are 32-bit), so every process sees a size too large to send.
  halves = np.array(divmod(len(blob), 2**30), np.int32)
  sizes = (np.asarray(multihost_utils.process_allgather(halves)).reshape(-1, 2).astype(np.int64) * [2**30, 1]).sum(1)
  if sizes.max() >= 2**31:
    raise HetlmError(
      f"{sizes.max() / 2**30:.1f} GiB to send from process {int(sizes.argmax())} to every process: more than the "
      "2 GiB one exchange carries (docs/SCALING.md)"
    )
  mine = np.frombuffer(blob, np.uint8)
  piece = int(min(GATHER_PIECE, max(int(sizes.max()), 1)))
  every = [bytearray(int(size)) for size in sizes]
  for at in range(0, max(int(sizes.max()), 1), piece):
    sent = np.zeros(piece, np.uint8)
    sent[: max(min(len(mine) - at, piece), 0)] = mine[at : at + piece]
    got = np.asarray(multihost_utils.process_allgather(sent)).reshape(len(sizes), piece)
    for i, size in enumerate(sizes):
      n = max(min(int(size) - at, piece), 0)
      every[i][at : at + n] = got[i, :n].tobytes()
  return [memoryview(b) for b in every]


def gather_arrays(*arrays: np.ndarray) -> list[list[np.ndarray]]:
  """Every process's `arrays` (any shapes and dtypes), in process order (every process must call this at the same
  point): through `gather_bytes`, so per-user results come back without padding every process to the largest."""
  if jax.process_count() == 1:
    return [[np.asarray(a) for a in arrays]]
  sent = io.BytesIO()
  np.save(sent, np.array(len(arrays)))
  for a in arrays:
    np.save(sent, np.asarray(a), allow_pickle=False)
  every = []
  for blob in gather_bytes(sent.getvalue()):
    got = io.BytesIO(blob)
    every.append([np.load(got, allow_pickle=False) for _ in range(int(np.load(got)))])
  return every


def to_ipc(table: pa.Table) -> bytes:
  """An Arrow table as the bytes of an IPC stream (what passes between processes)."""
  sink = pa.BufferOutputStream()
  with pa.ipc.new_stream(sink, table.schema) as writer:
    writer.write_table(table)
  return sink.getvalue().to_pybytes()


def from_ipc(blob) -> pa.Table:
  """The table of `to_ipc` bytes (or a view of them)."""
  return pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(blob))).read_all()


def gather_tables(table: pa.Table) -> list[pa.Table]:
  """Every process's `table`, in process order (every process must call this at the same point)."""
  return [from_ipc(blob) for blob in gather_bytes(to_ipc(table))]


@dataclasses.dataclass(frozen=True)
class Groups:
  """The processes as `count` groups, this one in group `index`, each group holding its own share of the users (the
  processes of a group hold the same share): per-group results brought together, each group counted once. Every
  process must call these at the same point; one group (the default) returns its own."""

  index: int = 0
  count: int = 1

  def each(self, *arrays: np.ndarray) -> list[list[np.ndarray]]:
    """Every group's `arrays`, in group order."""
    if self.count == 1:
      return [[np.asarray(a) for a in arrays]]
    by_group = {int(got[0]): got[1:] for got in gather_arrays(np.array(self.index), *arrays)}
    return [by_group[g] for g in range(self.count)]

  def sum(self, *arrays: np.ndarray) -> list[np.ndarray]:
    """The sum over the groups of each of `arrays` (the same shape in every group)."""
    every = self.each(*arrays)
    return [np.sum([group[i] for group in every], axis=0) for i in range(len(arrays))]

  PIECE_BYTES = 256 * 2**20  # per process and gather in `place`: large per-user results go in several

  def place(self, users: np.ndarray, wholes: list[np.ndarray], *results: np.ndarray) -> None:
    """Writes every group's per-user `results` (the last axis per user, one for each of its `users`, indices along
    the last axis of `wholes`) into `wholes`, so that every process holds them all; sent in pieces of at most
    PIECE_BYTES a process. One group: its own are written."""
    per_user = 8 + sum(r.dtype.itemsize * int(np.prod(r.shape[:-1])) for r in results)  # the same on every process
    chunk = max(1, self.PIECE_BYTES // per_user)
    users = np.asarray(users, np.int64)
    for at in range(0, most(len(users)) if self.count > 1 else max(len(users), 1), chunk):
      for got in self.each(users[at : at + chunk], *(r[..., at : at + chunk] for r in results)):
        for whole, part in zip(wholes, got[1:], strict=True):
          whole[..., got[0]] = part


def each(values) -> np.ndarray:
  """[P, n]: every process's `values` (n int32s, the same n on every process), in process order, in one all-gather
  (every process must call this at the same point)."""
  mine = np.asarray(values, np.int32).reshape(-1)
  if jax.process_count() == 1:
    return mine[None]
  return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)


def most(value: int) -> int:
  """The largest `value` (an int32) over the processes (every process must call this at the same point)."""
  return int(each([value]).max())


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_same(what: str, *arrays) -> None:
  """Raises HetlmError unless every process holds the same `arrays` (compared by a digest): hosts that read
  different data, or drifted apart, would otherwise train a wrong model or wait forever on each other."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).digest()[:16]
  mine = np.frombuffer(digest, np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differ:
    raise HetlmError(f"{what} differs between process 0 and process(es) {', '.join(map(str, differ))}")
