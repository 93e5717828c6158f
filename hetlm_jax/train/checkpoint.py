"""Orbax checkpoints of the stacked state plus the host-side run position (round, assignment, early stopping)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hetlm_jax import hosts
from hetlm_jax.errors import HetlmError
from hetlm_jax.files import Location, is_uri
from hetlm_jax.train.split import num_models
from hetlm_jax.train.state import TrainState


class Checkpoints:
  """WORKDIR/checkpoints/MODEL/STEP/: items `state` (sharded pytree), `best` (the round's best params and optimizer
  state so far, by validation NLL), `assignment` (user → cluster), `meta` (JSON) and, under --mix_init, `anchor`
  (the one model every cluster's predictions are mixed with; meta["mix"] holds the weights). Saves are
  asynchronous: `save` returns once the arrays are copied off the devices (so the next step may reuse their
  buffers) and orbax writes them in the background; reads and `close` wait for pending writes first."""

  def __init__(self, directory: Location, keep: int):
    # No rename on an object store: there, a step is complete once its commit_success.txt is written.
    commit_file = ocp.options.AtomicityOptions(ocp.options.AtomicityMode.COMMIT_FILE) if is_uri(directory) else None
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True, atomicity_options=commit_file
    )
    if os.fspath(directory).startswith("s3://"):
      orbax_on_s3()
    where = epath.Path(directory) if is_uri(directory) else Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      where, options=options, item_names=("state", "best", "assignment", "meta", "anchor")
    )

  def latest_step(self) -> int | None:
    """The step of the newest checkpoint (None without one), once pending saves are written."""
    self._manager.wait_until_finished()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of every kept checkpoint, once pending saves are written."""
    self._manager.wait_until_finished()
    return list(self._manager.all_steps())

  def save(
    self,
    state: TrainState,
    best: dict | None,
    assignment_U: np.ndarray,
    meta: dict,
    weights_UxK: np.ndarray | None = None,
    replace: bool = False,
    anchor=None,
  ) -> None:
    """`weights_UxK`: soft-EM responsibilities in use, kept so a resumed round trains on the same ones.
    `anchor`: one model's parameters, saved beside the state (--mix_init).
    `replace`: a checkpoint already saved at this step is replaced (the parameters changed without a step);
    otherwise it is kept. `best` None: the state's own parameters and optimizer state."""
    step = int(meta["step"])
    if step in self._manager.all_steps():
      if not replace:
        return
      self._manager.wait_until_finished()
      self._manager.delete(step)
    if best is None:
      best = {"params": state.params, "opt_state": state.opt_state}
    assignment = {"cluster": np.asarray(assignment_U, np.int32)}
    if weights_UxK is not None:
      assignment["weight"] = np.asarray(weights_UxK, np.float32)
    if hosts.own_users():  # each process's users' rows: one array of every process's, each writing its own
      rows = _rows_each(len(assignment_U))
      meta = {**meta, "own_users": [hosts.share()[1], rows]}
      assignment = {key: _by_process(x, rows, -1 if key == "cluster" else 0) for key, x in assignment.items()}
    items = {
      "state": ocp.args.StandardSave(state),
      "best": ocp.args.StandardSave(best),
      "assignment": ocp.args.StandardSave(assignment),
      "meta": ocp.args.JsonSave({**meta, "soft": weights_UxK is not None}),
    }
    if anchor is not None:
      items["anchor"] = ocp.args.StandardSave(anchor)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, abstract: TrainState, num_users: int, step: int | None = None, every_user: bool = False):
    """Restores onto the shardings carried by `abstract`; returns (state, best, assignment, meta, weights or None).

    The assignment (and weights) are of `num_users` users in the order the run holds them; with --own_users, this
    process's. A checkpoint saved with --own_users is resumed only by as many processes with --own_users, and one
    saved without by processes without. `every_user`: whoever reads it gets every user's, in the order it was saved
    (each process's users one after the other), e.g. for the clusters' shares of a trained model."""
    self._manager.wait_until_finished()
    step = self._manager.latest_step() if step is None else step
    meta = self.meta(step)
    processes, rows = meta.get("own_users", (0, 0))
    mine = hosts.own_users() and not every_user
    if not every_user and processes != (hosts.share()[1] if mine else 0):
      now = f"{hosts.share()[1]} processes each holding its own users" if mine else "processes holding every user"
      then = f"{processes} processes each holding its own users" if processes else "processes holding every user"
      raise HetlmError(
        f"{self._manager.directory}: saved by {then} (--own_users), so {now} cannot resume it; resume it as "
        "it was saved"
      )
    shape = (processes * rows,) if processes else (num_users,)
    abstract_assignment = {"cluster": self._abstract(shape, np.int32, mine)}
    if meta.get("soft"):
      k = num_models(abstract.params)
      abstract_assignment["weight"] = self._abstract((*shape, k), np.float32, mine)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        best=ocp.args.StandardRestore({"params": abstract.params, "opt_state": abstract.opt_state}),
        assignment=ocp.args.StandardRestore(abstract_assignment),
        meta=ocp.args.JsonRestore(),
      ),
    )
    assignment = {key: _own_rows(x) if mine else np.asarray(x) for key, x in restored["assignment"].items()}
    if processes:  # this process's users (--own_users), or every process's users one after the other
      kept = slice(0, num_users) if mine else assignment["cluster"] >= 0
      assignment = {key: x[kept] for key, x in assignment.items()}
    return (
      restored["state"],
      dict(restored["best"]),
      assignment["cluster"],
      dict(restored["meta"]),
      assignment.get("weight"),
    )

  @staticmethod
  def _abstract(shape, dtype, by_process: bool):
    if not by_process:
      return np.zeros(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=_process_sharding(len(shape)))

  def restore_anchor(self, abstract_anchor, step: int | None = None):
    """The `anchor` item of a checkpoint saved with one, onto the shardings of `abstract_anchor`."""
    self._manager.wait_until_finished()
    step = self._manager.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(anchor=ocp.args.StandardRestore(abstract_anchor)))
    return restored["anchor"]

  def meta(self, step: int | None = None) -> dict:
    """The `meta` item (the run position, K, the model) of the checkpoint at `step` (default: the newest)."""
    self._manager.wait_until_finished()
    step = self._manager.latest_step() if step is None else step
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def _rows_each(users: int) -> int:
  """Rows a process takes in a per-process array: the most users any process holds, rounded up to fill its devices."""
  d = jax.local_device_count()
  return max(-(-hosts.most(users) // d) * d, d)


def _process_sharding(ndim: int) -> NamedSharding:
  """Axis 0 over every device, in process order, so that each process holds one block of rows."""
  devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
  return NamedSharding(Mesh(devices, ("p",)), P("p", *([None] * (ndim - 1))))


def _by_process(x: np.ndarray, rows: int, fill) -> jax.Array:
  """[P x rows, ...]: each process's `x` (its users' rows) padded with `fill` to `rows`, as one global array."""
  padded = np.full((rows, *x.shape[1:]), fill, x.dtype)
  padded[: len(x)] = x
  sharding = _process_sharding(x.ndim)
  return jax.make_array_from_process_local_data(sharding, padded, (hosts.share()[1] * rows, *x.shape[1:]))


def _own_rows(x: jax.Array) -> np.ndarray:
  """This process's block of rows of a `_by_process` array."""
  return hosts.fetch_local(x)[1]


@functools.cache
def orbax_on_s3() -> None:
  """Lets orbax write s3:// checkpoints. orbax (0.12) writes its own files there through etils.epath (s3fs), but
  builds the TensorStore spec of the arrays for gs:// and local paths only: its path normalisation turns s3://b/x
  into s3:/b/x, which it then refuses as not absolute. TensorStore itself has an s3 driver, so s3:// paths are kept
  whole and given that driver, with the endpoint and region the AWS SDKs read from the environment
  (AWS_ENDPOINT_URL, AWS_REGION, the keys; files.py). Only the s3:// case changes; orbax's own logic does the
  rest. Plain orbax reads an s3:// checkpoint of this package's once this has been called."""
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

  normalize, use_gcs, gcs_kvstore = ts_utils._normalize_path, ts_utils._use_gcs_driver, gcs_utils.get_kvstore_for_gcs

  def _normalize(path: str) -> str:
    return "s3://" + os.path.normpath(path[len("s3://") :]) if path.startswith("s3://") else normalize(path)

  def _kvstore(path: str) -> dict:
    if not path.startswith("s3://"):
      return gcs_kvstore(path)
    bucket, _, key = path[len("s3://") :].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
      spec["endpoint"] = endpoint
    if region:
      spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # keys in the environment: no profile file to look for (and log about)
      spec["aws_credentials"] = {"type": "environment"}
    return spec

  ts_utils._normalize_path = _normalize
  ts_utils._use_gcs_driver = lambda directory: directory.startswith("s3://") or use_gcs(directory)
  gcs_utils.get_kvstore_for_gcs = _kvstore
