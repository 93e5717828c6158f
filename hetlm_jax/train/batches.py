"""Per-cluster packed training batches, indexed by step so a resumed run needs no replay of the loader.

A user's training examples are windows of `context + 1` tokens that together cover their whole
history (`all_windows`; most users have one). Browsing histories are short, so examples are packed:
each cluster's examples, in a shuffled order, are laid end to end and cut into rows of `context + 1`
tokens, with a segment id per example (0 = padding) that keeps attention inside it. An example cut
by a row end continues as its own segment in the next row. An epoch lasts as many steps as the
cluster with the most tokens needs for one pass, and the batch shape never changes.

Clusters are rarely the same size. With `balance` (the default), a smaller cluster does not fill the
rest of the epoch with padding: it goes on cycling its own examples, reshuffled each cycle, until its
rows are full, and every token's weight is divided by the number of times it appears in the epoch. So
each user still counts once per epoch (the weights of a user's tokens sum to their number, as without
balance), the steps are as many, and the padding is only the largest cluster's last row ends. `max_repeat`
caps the cycles: a small cluster's users appear at most that many times a pass, and the rest of its rows
are padding, so a cluster of few users does not see each of them many times per pass.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from hetlm_jax import hosts
from hetlm_jax.data.ownership import user_hash
from hetlm_jax.data.sequences import UserSequences, all_windows
from hetlm_jax.data.tokenizer import BOS, EOS, PAD
from hetlm_jax.errors import HetlmError


class ClusterBatches:
  """`weights_UxK` (soft EM): every user is an example of every cluster whose responsibility for the user
  is at least MIN_WEIGHT, its tokens weighted by it in that cluster's loss. Without: of its own cluster
  in `assignment_U`, with weight 1. `balance`: see the module docstring. `stream`: more seeds of the shuffles (a
  shard's, in ShardedBatches)."""

  MIN_WEIGHT = 0.01

  def __init__(
    self,
    seqs: UserSequences,
    assignment_U: np.ndarray,
    k: int,
    batch_size: int,
    context: int,
    epochs: int,
    seed: int,
    round_index: int,
    weights_UxK: np.ndarray | None = None,
    balance: bool = True,
    max_repeat: int = 0,
    stream: tuple[int, ...] = (),
  ):
    self.seqs, self.assignment_U, self.stream = seqs, np.asarray(assignment_U), stream
    self.k, self.batch_size, self.width, self.epochs = k, batch_size, context + 1, epochs
    self.seed, self.round_index, self.balance, self.max_repeat = seed, round_index, balance, max_repeat
    owner_W, first_W, lengths_W, _ = all_windows(seqs, "history", self.width)
    if weights_UxK is None:
      window_X, self.cluster_X, self.weight_X = np.arange(len(owner_W)), self.assignment_U[owner_W], None
    else:
      window_X, self.cluster_X = np.nonzero(np.asarray(weights_UxK)[owner_W] >= self.MIN_WEIGHT)
      self.weight_X = np.asarray(weights_UxK, np.float32)[owner_W[window_X], self.cluster_X]
    self.owner_X, self.first_X, self.lengths_X = owner_W[window_X], first_W[window_X], lengths_W[window_X]
    self.tokens_K = np.bincount(self.cluster_X, weights=self.lengths_X, minlength=k).astype(np.int64)
    rows = -(-int(self.tokens_K.max()) // self.width)
    self.set_steps(max(1, -(-rows // batch_size)))

  def set_steps(self, steps_per_epoch: int) -> None:
    """An epoch of `steps_per_epoch` steps: what the largest cluster needs (the default), or more (ShardedBatches
    gives every shard the most that any shard needs)."""
    self.steps_per_epoch = steps_per_epoch
    self.capacity = steps_per_epoch * self.batch_size * self.width  # token slots per cluster per epoch
    self.cycles_K = np.ones(self.k, np.int64)  # how many times each cluster's examples appear in an epoch
    if self.balance:
      self.cycles_K = np.where(self.tokens_K > 0, -(-self.capacity // np.maximum(self.tokens_K, 1)), 0)
      if self.max_repeat:
        self.cycles_K = np.minimum(self.cycles_K, self.max_repeat)
    # Token slots an epoch fills with real tokens (a cluster's last cycle is cut where its rows are full).
    self.tokens_per_epoch = int(np.minimum(self.cycles_K * self.tokens_K, self.capacity).sum())
    self._cached: tuple[int, dict] = (-1, {})

  @property
  def steps(self) -> int:
    """Steps of the round: steps per epoch times its epochs."""
    return self.steps_per_epoch * self.epochs

  def order(self, epoch: int) -> np.ndarray:
    """Examples of an epoch, by cluster: segment id s in that epoch is example order[s-1], a window of user
    owner_X[order[s-1]]. Without balance each example appears once, shuffled within its cluster; with it, a
    cluster's examples appear in `cycles` successive shuffles, the last one cut where its rows are full."""
    rng = np.random.default_rng([self.seed, self.round_index, epoch, *self.stream])
    if not self.balance:
      return np.lexsort((rng.random(len(self.cluster_X)), self.cluster_X))
    cycles_K = self.cycles_K
    example = np.repeat(np.arange(len(self.cluster_X)), cycles_K[self.cluster_X])
    cluster = self.cluster_X[example]
    # The cycle number of each copy: its rank among the copies of the same example.
    cycle = np.arange(len(example)) - np.repeat(
      np.cumsum(cycles_K[self.cluster_X]) - cycles_K[self.cluster_X], cycles_K[self.cluster_X]
    )
    return example[np.lexsort((rng.random(len(example)), cycle, cluster))]

  def _plan(self, epoch: int) -> dict:
    """Where every example copy of an epoch goes, per copy, not per token: its example, its span [start, end) in
    the concatenated streams of the K clusters (cluster k's stream is slots [k * capacity, (k+1) * capacity), cut
    at its end), and what a token's weight needs. A batch's rows are then filled from the copies that overlap
    them alone (`batch`), so no array of the epoch's tokens is ever built."""
    if self._cached[0] == epoch:
      return self._cached[1]
    order = self.order(epoch)
    cluster, length = self.cluster_X[order], self.lengths_X[order]
    # Each copy's position in its cluster's stream: the copies of a cluster are consecutive in `order`.
    end = np.cumsum(length)
    cluster_base = np.zeros(self.k + 1, np.int64)
    np.add.at(cluster_base, cluster + 1, length)
    start = end - length - np.cumsum(cluster_base)[cluster]
    kept = np.clip(self.capacity - start, 0, length)  # the tokens of each copy that fit (one cut per cluster)
    start = np.minimum(start, self.capacity)  # copies past the cut: empty spans at the stream's end, so in order
    plan = {"example": order, "start": cluster * self.capacity + start, "end": cluster * self.capacity + start + kept}
    if self.balance:  # a token that appears n times in the epoch counts 1/n each time
      plan["whole_X"] = np.bincount(order[kept == length], minlength=len(self.cluster_X))
      cut = (kept > 0) & (kept < length)
      plan["cut_X"] = np.zeros(len(self.cluster_X), np.int64)
      plan["cut_X"][order[cut]] = kept[cut]
    self._cached = (epoch, plan)  # one assignment: a reader in another thread sees an epoch with its own plan
    return plan

  def batch(
    self, step_in_round: int, clusters: slice = slice(None), rows: slice = slice(None)
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens and segment ids [K, B, T+1] int32, and token weights [K, B, T+1] float32 (0: padding); or only
    the block `clusters` x `rows` of them (a process's share of the global batch: hosts.local_block). The cost
    is the block's tokens, whatever the epoch's size."""
    epoch, i = divmod(step_in_round, self.steps_per_epoch)
    plan = self._plan(epoch)
    k0, k1, _ = clusters.indices(self.k)
    r0, r1, _ = rows.indices(self.batch_size)
    shape = (k1 - k0, r1 - r0, self.width)
    tokens, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    first_slot = (i * self.batch_size + r0) * self.width  # of the block's rows, in each cluster's stream
    spans = []
    for k in range(k0, k1):
      a, b = k * self.capacity + first_slot, k * self.capacity + first_slot + (r1 - r0) * self.width
      lo, hi = np.searchsorted(plan["end"], a, side="right"), np.searchsorted(plan["start"], b, side="left")
      copy = np.arange(lo, hi)
      at, local = np.full(len(copy), a), np.full(len(copy), k - k0)
      spans.append((copy, np.maximum(plan["start"][copy], a), np.minimum(plan["end"][copy], b), at, local))
    copy_C, from_C, to_C, base_C, local_C = (np.concatenate(part) for part in zip(*spans, strict=True))
    n_C = np.maximum(to_C - from_C, 0)
    copy = np.repeat(copy_C, n_C)
    slot = np.repeat(from_C, n_C) + np.arange(int(n_C.sum())) - np.repeat(np.cumsum(n_C) - n_C, n_C)
    offset = slot - plan["start"][copy]  # the token's place in its window
    example = plan["example"][copy]
    where = (np.repeat(local_C, n_C), *np.divmod(slot - np.repeat(base_C, n_C), self.width))
    tokens[where] = self.seqs.tokens[self.first_X[example] + offset]
    segments[where] = copy + 1
    weight = np.ones(len(copy), np.float32) if self.weight_X is None else self.weight_X[example]
    if self.balance:
      weight = weight / (plan["whole_X"][example] + (offset < plan["cut_X"][example]))
    weights[where] = weight
    return tokens, segments, weights

  def padding_fraction(self) -> float:
    """Padded slots over all slots of an epoch's K x rows x (T+1) batches (the same for every epoch)."""
    return 1.0 - self.tokens_per_epoch / (self.k * self.capacity)


class ShardedBatches:
  """--data_shards=S: the users are cut into S shards by the hash of their id (data/ownership.py), and shard s fills
  rows [s B/S, (s+1) B/S) of every cluster's batch from its own users alone: a ClusterBatches of B/S rows, shuffled
  by its own stream, every shard's epoch as many steps as the largest shard needs (agreed over the processes).
  A process plans and builds only the shards its rows hold (`rows`: its hosts.local_block), so when S is a multiple
  of the groups of processes holding different rows, none touches another's users; and the batches are the same
  whatever the number of processes, so a run resumes on any. Same interface as ClusterBatches."""

  def __init__(
    self,
    seqs: UserSequences,
    assignment_U: np.ndarray,
    k: int,
    batch_size: int,
    context: int,
    epochs: int,
    shards: int = 2,
    rows: slice = slice(None),
    weights_UxK: np.ndarray | None = None,
    **options,
  ):
    """`options`: ClusterBatches's seed, round_index, balance and max_repeat, for every shard."""
    self.k, self.batch_size, self.width, self.epochs, self.shards = k, batch_size, context + 1, epochs, shards
    self.rows_each = batch_size // shards
    self.parts: dict[int, ClusterBatches] = {}
    if hosts.own_users():  # a process's users are its shard, however they came to it (their hash, or its parts)
      if (list(self._shards(rows)), shards) != ([hosts.share()[0]], hosts.share()[1]):
        raise HetlmError(
          f"--own_users: process {hosts.share()[0]} builds shards {list(self._shards(rows))} of {shards}, not its "
          "own users' shard: --data_shards must be the number of processes, one block of rows each, in process order"
        )
      shard_U = np.full(seqs.num_users, hosts.share()[0], np.int64)
    else:
      shard_U = (user_hash(pa.array(seqs.user_ids.astype(str))) % np.uint64(shards)).astype(np.int64)
    for s in self._shards(rows):
      users = np.flatnonzero(shard_U == s)
      weights = None if weights_UxK is None else np.asarray(weights_UxK)[users]
      sub = seqs.subset(users)
      assigned = np.asarray(assignment_U)[users]
      self.parts[s] = ClusterBatches(
        sub, assigned, k, self.rows_each, context, epochs, weights_UxK=weights, stream=(s,), **options
      )
    self.steps_per_epoch = hosts.most(max(part.steps_per_epoch for part in self.parts.values()))
    for part in self.parts.values():
      part.set_steps(self.steps_per_epoch)
    tokens_S = {}  # every shard's real tokens an epoch, once, whichever processes built it
    mine = (np.array(list(self.parts)), np.array([part.tokens_per_epoch for part in self.parts.values()]))
    for built, tokens in hosts.gather_arrays(*mine):
      tokens_S.update(zip(built.tolist(), tokens.tolist()))
    self.tokens_per_epoch = sum(tokens_S.values())

  def _shards(self, rows: slice) -> range:
    r0, r1, _ = rows.indices(self.batch_size)
    return range(r0 // self.rows_each, -(-r1 // self.rows_each))

  @property
  def steps(self) -> int:
    """Steps of the round: steps per epoch times its epochs."""
    return self.steps_per_epoch * self.epochs

  def batch(
    self, step_in_round: int, clusters: slice = slice(None), rows: slice = slice(None)
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ClusterBatches.batch: the block `clusters` x `rows`, each shard's rows from that shard."""
    r0, r1, _ = rows.indices(self.batch_size)
    pieces = []
    for s in self._shards(rows):
      first = s * self.rows_each
      block = slice(max(r0, first) - first, min(r1, first + self.rows_each) - first)
      pieces.append(self.parts[s].batch(step_in_round, clusters, block))
    return tuple(np.concatenate(part, axis=1) for part in zip(*pieces, strict=True))

  def padding_fraction(self) -> float:
    """Padded slots over all slots of an epoch's K x rows x (T+1) batches."""
    return 1.0 - self.tokens_per_epoch / (self.k * self.steps_per_epoch * self.batch_size * self.width)


def training_batches(cfg, seqs: UserSequences, assignment_U, k: int, epochs: int, round_index: int, weights_UxK, rows):
  """A round's batches by the config: ClusterBatches, or ShardedBatches with --data_shards above 1 (`rows`: the rows
  of the global batch this process builds)."""
  t = cfg.train
  shape = (seqs, assignment_U, k, t.batch_size, cfg.model.context, epochs)
  options = {"seed": t.seed, "round_index": round_index, "balance": t.balance, "max_repeat": t.max_repeat}
  if t.data_shards > 1:
    return ShardedBatches(*shape, shards=t.data_shards, rows=rows, weights_UxK=weights_UxK, **options)
  return ClusterBatches(*shape, weights_UxK=weights_UxK, **options)


class ScoringBatches:
  """Every window of `all_windows` once, packed into fixed slots so no window is cut and little is padding.

  A row of `width` tokens is divided into slots of width, width/2, width/4, ... (at least 4 tokens);
  each window goes into the smallest slot it fits. Rows come in batches of `batch_rows`. With
  `pages_only`, predictions of BOS and EOS are left out of the score mask.
  """

  def __init__(self, seqs: UserSequences, part: str, width: int, batch_rows: int, pages_only: bool = False):
    self.seqs, self.width, self.batch_rows, self.pages_only = seqs, width, batch_rows, pages_only
    self.owner_W, self.start_W, self.length_W, self.scored_W = all_windows(seqs, part, width)
    self.length_U = np.bincount(self.owner_W, weights=self.length_W, minlength=seqs.num_users)
    slots = self.slot_widths(width)
    slot_class_W = np.searchsorted(-np.array(slots), -self.length_W, side="right") - 1
    self.row_W = np.zeros(len(self.owner_W), np.int64)
    self.col_W = np.zeros(len(self.owner_W), np.int64)
    rows = 0
    for j, slot in enumerate(slots):  # a handful of slot sizes, not a loop over windows
      windows = np.flatnonzero(slot_class_W == j)
      per_row = width // slot
      self.row_W[windows] = rows + np.arange(len(windows)) // per_row
      self.col_W[windows] = (np.arange(len(windows)) % per_row) * slot
      rows += -(-len(windows) // per_row)
    self.num_batches = max(1, -(-rows // batch_rows))
    # The windows of batch i are by_batch[batch_start[i]:batch_start[i+1]]: found once, so a batch costs its rows.
    self.by_batch = np.argsort(self.row_W // batch_rows, kind="stable")
    self.batch_start = np.searchsorted(self.row_W[self.by_batch] // batch_rows, np.arange(self.num_batches + 1))

  @staticmethod
  def slot_widths(width: int) -> list[int]:
    """The widths a row of `width` tokens is cut into for short windows: width, width/2, ... down to 4."""
    return [width // 2**j for j in range(8) if width // 2**j >= 4] or [width]

  @classmethod
  def max_windows(cls, width: int, batch_rows: int) -> int:
    """The most windows (so users) one batch can hold: every row cut into the narrowest slots."""
    return batch_rows * (width // cls.slot_widths(width)[-1])

  def batch(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """tokens and segments [B, T+1] int32, score mask [B, T] bool, user of each token [B, T+1] (-1: none); past
    the last batch, an empty one (a process with fewer batches than another waits for it with those)."""
    i = min(i, self.num_batches)
    windows = self.by_batch[self.batch_start[i] : self.batch_start[min(i + 1, self.num_batches)]]
    length = self.length_W[windows]
    window = np.repeat(windows, length)
    offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    where = (self.row_W[window] - i * self.batch_rows, self.col_W[window] + offset)
    shape = (self.batch_rows, self.width)
    tokens, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    owner = np.full(shape, -1, np.int64)
    scored = np.zeros(shape, bool)
    token_index = self.start_W[window] + offset
    tokens[where] = self.seqs.tokens[token_index]
    segments[where] = window + 1
    owner[where] = self.owner_W[window]
    scored[where] = token_index >= self.scored_W[window]
    if self.pages_only:
      scored &= (tokens != BOS) & (tokens != EOS)
    return tokens, segments, scored[:, 1:] & (segments[:, 1:] == segments[:, :-1]), owner


def scored_users(mask_BxT: np.ndarray, owner_BxT1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The users a scoring batch scores (users_R, sorted), each scored position's index among them (local_BxT, -1
  where nothing is scored) and how many tokens each has (count_R): O(batch), whatever the number of users."""
  users_R, local_BxT, count_R = np.unique(
    np.where(mask_BxT, owner_BxT1[:, 1:], -1), return_inverse=True, return_counts=True
  )
  unscored = int(users_R[0] < 0)
  local_BxT = local_BxT.reshape(mask_BxT.shape).astype(np.int32) - unscored
  return users_R[unscored:], local_BxT, count_R[unscored:]


def add_by_user(sums_UxF: np.ndarray, owner_N: np.ndarray, values_NxF: np.ndarray) -> None:
  """sums_UxF[owner_N[n]] += values_NxF[n] for every n, through the rows' own users only: O(N), not O(U)."""
  users_R, local_N = np.unique(owner_N, return_inverse=True)
  n = len(owner_N)
  to_user_RxN = sp.csr_matrix((np.ones(n), (local_N, np.arange(n))), shape=(len(users_R), n))
  sums_UxF[users_R] += to_user_RxN @ values_NxF


def prompts(seqs: UserSequences, users_B: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts [B, length] (the most recent history tokens, plus BOS when the held-out target
  is a new session or there is none) and the padding count of each row; user -1 gives an all-padding row."""
  real_B = users_B >= 0
  u_B = np.where(real_B, users_B, 0)
  # A target that opens a session, or none at all (a whole sequence, split by user): a new session follows.
  no_target_B = seqs.split[u_B] >= seqs.offsets[u_B + 1]
  opens_session_B = (seqs.tokens[np.minimum(seqs.split[u_B], len(seqs.tokens) - 1)] == BOS) | no_target_B
  # A trailing BOS is appended for new-session targets, so take one history token fewer.
  hist_B = np.minimum(seqs.split[u_B] - seqs.offsets[u_B], length - opens_session_B)
  len_B = np.where(real_B, hist_B + opens_session_B, 1)
  pad_B = length - len_B
  cols_BxT = np.arange(length)[None, :]
  src_BxT = seqs.split[u_B][:, None] - hist_B[:, None] + (cols_BxT - pad_B[:, None])
  take_BxT = (cols_BxT >= pad_B[:, None]) & (cols_BxT - pad_B[:, None] < hist_B[:, None])
  out_BxT = np.where(take_BxT, seqs.tokens[np.clip(src_BxT, 0, len(seqs.tokens) - 1)], PAD)
  out_BxT[np.arange(len(u_B)), length - 1] = np.where(opens_session_B, BOS, out_BxT[:, length - 1])
  out_BxT[~real_B] = PAD
  return out_BxT.astype(np.int32), pad_B.astype(np.int32)
