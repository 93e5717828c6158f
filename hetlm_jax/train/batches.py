"""Per-cluster packed training batches, indexed by step so a resumed run needs no replay of the loader.

A user's training example is the most recent `context + 1` tokens of their history. Browsing
histories are short, so examples are packed: each cluster's examples, in a shuffled order, are laid
end to end and cut into rows of `context + 1` tokens, with a segment id per example (0 = padding)
that keeps attention inside it. An example cut by a row end continues as its own segment in the next
row. A round lasts as many steps as the cluster with the most tokens needs for `epochs` passes;
other clusters fill the rest with padding rows, so every user is seen exactly `epochs` times per
round whatever the cluster sizes, and the batch shape never changes.
"""

from __future__ import annotations

import numpy as np

from hetlm_jax.data.sequences import UserSequences, window_bounds


class ClusterBatches:

  def __init__(self, seqs: UserSequences, assignment_U: np.ndarray, k: int, batch_size: int, context: int,
               epochs: int, seed: int, round_index: int):
    self.seqs, self.assignment_U = seqs, np.asarray(assignment_U)
    self.k, self.batch_size, self.width, self.epochs = k, batch_size, context + 1, epochs
    self.seed, self.round_index = seed, round_index
    self.first_U, self.lengths_U, _ = window_bounds(seqs, "history", self.width)
    tokens_K = np.bincount(self.assignment_U, weights=self.lengths_U, minlength=k)
    rows = -(-int(tokens_K.max()) // self.width)
    self.steps_per_epoch = max(1, -(-rows // batch_size))
    self._epoch, self._tables = -1, None

  @property
  def steps(self) -> int:
    return self.steps_per_epoch * self.epochs

  def order(self, epoch: int) -> np.ndarray:
    """Users of an epoch: by cluster, shuffled within it; segment id s in that epoch is user order[s-1]."""
    rng = np.random.default_rng([self.seed, self.round_index, epoch])
    return np.lexsort((rng.random(len(self.assignment_U)), self.assignment_U))

  def _pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and segment ids [K, steps_per_epoch * B, T+1] of one epoch."""
    order = self.order(epoch)
    cluster, length = self.assignment_U[order], self.lengths_U[order]
    # Position of each example in its cluster's stream.
    end = np.cumsum(length)
    cluster_base = np.zeros(self.k + 1, np.int64)
    np.add.at(cluster_base, cluster + 1, length)
    start = end - length - np.cumsum(cluster_base)[cluster]
    # One entry per token: which example, and where in the stream.
    total = int(end[-1]) if len(end) else 0
    example = np.repeat(np.arange(len(order)), length)
    offset = np.arange(total) - np.repeat(end - length, length)
    pos = start[example] + offset
    first = self.first_U[order]
    rows = self.steps_per_epoch * self.batch_size
    tokens = np.zeros((self.k, rows, self.width), np.int32)
    segments = np.zeros((self.k, rows, self.width), np.int32)
    where = (cluster[example], pos // self.width, pos % self.width)
    tokens[where] = self.seqs.tokens[first[example] + offset]
    segments[where] = example + 1
    return tokens, segments

  def batch(self, step_in_round: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and segment ids [K, B, T+1] int32 for this step of the round."""
    epoch, i = divmod(step_in_round, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._tables = epoch, self._pack(epoch)
    rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
    return self._tables[0][:, rows], self._tables[1][:, rows]


class ScoringBatches:
  """Every user's window once, packed into fixed slots so no window is cut and little is padding.

  A row of `width` tokens is divided into slots of width, width/2, width/4, ... (at least 4 tokens);
  each window goes into the smallest slot it fits. Rows come in batches of `batch_rows`.
  """

  def __init__(self, seqs: UserSequences, part: str, width: int, batch_rows: int):
    self.seqs, self.width, self.batch_rows = seqs, width, batch_rows
    self.start_U, self.length_U, self.scored_U = window_bounds(seqs, part, width)
    slots = [width // 2**j for j in range(8) if width // 2**j >= 4] or [width]
    slot_class_U = np.searchsorted(-np.array(slots), -self.length_U, side="right") - 1
    self.row_U = np.zeros(seqs.num_users, np.int64)
    self.col_U = np.zeros(seqs.num_users, np.int64)
    rows = 0
    for j, slot in enumerate(slots):  # a handful of slot sizes, not a loop over users
      users = np.flatnonzero(slot_class_U == j)
      per_row = width // slot
      self.row_U[users] = rows + np.arange(len(users)) // per_row
      self.col_U[users] = (np.arange(len(users)) % per_row) * slot
      rows += -(-len(users) // per_row)
    self.num_batches = max(1, -(-rows // batch_rows))

  def batch(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """tokens and segments [R, W] int32, score mask [R, W-1] bool, user of each token [R, W] (-1: none)."""
    users = np.flatnonzero((self.row_U >= i * self.batch_rows) & (self.row_U < (i + 1) * self.batch_rows))
    length = self.length_U[users]
    user = np.repeat(users, length)
    offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    where = (self.row_U[user] - i * self.batch_rows, self.col_U[user] + offset)
    shape = (self.batch_rows, self.width)
    tokens, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    owner = np.full(shape, -1, np.int64)
    scored = np.zeros(shape, bool)
    token_index = self.start_U[user] + offset
    tokens[where] = self.seqs.tokens[token_index]
    segments[where] = user + 1
    owner[where] = user
    scored[where] = token_index >= self.scored_U[user]
    return tokens, segments, scored[:, 1:] & (segments[:, 1:] == segments[:, :-1]), owner
