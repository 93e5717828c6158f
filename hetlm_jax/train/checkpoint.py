"""Orbax checkpoints of the stacked state plus the host-side run position (round, assignment, early stopping)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from hetlm_jax.train.split import num_models
from hetlm_jax.train.state import TrainState


class Checkpoints:
  """WORKDIR/checkpoints/MODEL/STEP/: items `state` (sharded pytree), `best` (the round's best params and optimizer
  state so far, by validation NLL), `assignment` (user → cluster), `meta` (JSON) and, under --mix_init, `anchor`
  (the one model every cluster's predictions are mixed with; meta["mix"] holds the weights). Saves are
  asynchronous: `save` returns once the arrays are copied off the devices (so the next step may reuse their
  buffers) and orbax writes them in the background; reads and `close` wait for pending writes first."""

  def __init__(self, directory: Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
      Path(directory).absolute(), options=options, item_names=("state", "best", "assignment", "meta", "anchor")
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
    items = {
      "state": ocp.args.StandardSave(state),
      "best": ocp.args.StandardSave(best),
      "assignment": ocp.args.StandardSave(assignment),
      "meta": ocp.args.JsonSave({**meta, "soft": weights_UxK is not None}),
    }
    if anchor is not None:
      items["anchor"] = ocp.args.StandardSave(anchor)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, abstract: TrainState, num_users: int, step: int | None = None):
    """Restores onto the shardings carried by `abstract`; returns (state, best, assignment, meta, weights or None)."""
    self._manager.wait_until_finished()
    step = self._manager.latest_step() if step is None else step
    abstract_assignment = {"cluster": np.zeros(num_users, np.int32)}
    if self.meta(step).get("soft"):
      k = num_models(abstract.params)
      abstract_assignment["weight"] = np.zeros((num_users, k), np.float32)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        best=ocp.args.StandardRestore({"params": abstract.params, "opt_state": abstract.opt_state}),
        assignment=ocp.args.StandardRestore(abstract_assignment),
        meta=ocp.args.JsonRestore(),
      ),
    )
    assignment = restored["assignment"]
    weights = np.asarray(assignment["weight"]) if "weight" in assignment else None
    return (
      restored["state"],
      dict(restored["best"]),
      np.asarray(assignment["cluster"]),
      dict(restored["meta"]),
      weights,
    )

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
