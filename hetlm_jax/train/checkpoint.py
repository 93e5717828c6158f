"""Orbax checkpoints of the stacked state plus the host-side run position (round, assignment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from hetlm_jax.train.state import TrainState


class Checkpoints:
  """WORKDIR/checkpoints: items `state` (sharded pytree), `assignment` (user → cluster) and `meta` (JSON)."""

  def __init__(self, workdir: Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                                          item_names=("state", "assignment", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, assignment_U: np.ndarray, meta: dict) -> None:
    step = int(meta["step"])
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      assignment=ocp.args.StandardSave({"cluster": np.asarray(assignment_U, np.int32)}),
      meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, abstract: TrainState, num_users: int, step: int | None = None):
    """Restores onto the shardings carried by `abstract`; returns (state, assignment, meta)."""
    step = self._manager.latest_step() if step is None else step
    abstract_assignment = {"cluster": np.zeros(num_users, np.int32)}
    restored = self._manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      assignment=ocp.args.StandardRestore(abstract_assignment),
      meta=ocp.args.JsonRestore()))
    return restored["state"], np.asarray(restored["assignment"]["cluster"]), dict(restored["meta"])

  def meta(self, step: int | None = None) -> dict:
    step = self._manager.latest_step() if step is None else step
    return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def close(self) -> None:
    self._manager.close()
