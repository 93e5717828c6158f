"""Per-cluster training batches, indexed by step so a resumed run needs no replay of the loader.

Each step takes B users from every cluster. A round lasts as many steps as the largest cluster needs
for `epochs` passes; smaller clusters fill the rest with empty (masked) rows, so every user is seen
exactly `epochs` times per round whatever the cluster sizes, and the batch shape never changes.
"""

from __future__ import annotations

import numpy as np

from hetlm_jax.data.sequences import UserSequences, history_windows


class ClusterBatches:

  def __init__(self, seqs: UserSequences, assignment_U: np.ndarray, k: int, batch_size: int, context: int,
               epochs: int, seed: int, round_index: int):
    self.seqs, self.assignment_U = seqs, np.asarray(assignment_U)
    self.k, self.batch_size, self.context, self.epochs = k, batch_size, context, epochs
    self.seed, self.round_index = seed, round_index
    sizes_K = np.bincount(self.assignment_U, minlength=k)
    self.steps_per_epoch = max(1, -(-int(sizes_K.max()) // batch_size))
    self._epoch, self._table = -1, None

  @property
  def steps(self) -> int:
    return self.steps_per_epoch * self.epochs

  def _order(self, epoch: int) -> np.ndarray:
    """[K, steps_per_epoch * B] user indices: each cluster's users shuffled, then -1 padding."""
    rng = np.random.default_rng([self.seed, self.round_index, epoch])
    order = np.lexsort((rng.random(len(self.assignment_U)), self.assignment_U))
    clusters = self.assignment_U[order]
    starts_K = np.searchsorted(clusters, np.arange(self.k))
    table = np.full((self.k, self.steps_per_epoch * self.batch_size), -1, np.int64)
    table[clusters, np.arange(len(order)) - starts_K[clusters]] = order
    return table

  def batch(self, step_in_round: int) -> tuple[np.ndarray, np.ndarray]:
    """inputs [K, B, T+1] int32 and loss mask [K, B, T] bool for this step of the round."""
    epoch, i = divmod(step_in_round, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._table = epoch, self._order(epoch)
    users_KxB = self._table[:, i * self.batch_size:(i + 1) * self.batch_size]
    inputs, valid = history_windows(self.seqs, users_KxB.reshape(-1), self.context)
    shape = (self.k, self.batch_size)
    return inputs.reshape(*shape, -1), valid[:, 1:].reshape(*shape, -1)
