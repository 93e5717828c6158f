"""Packed per-cluster batches: every user seen `epochs` times per round, shapes fixed, packing exact."""

import jax
import numpy as np
import pyarrow as pa
import pytest
from synthetic import markov_events

from hetlm_jax import hosts
from hetlm_jax.config import Config, ModelConfig, TrainConfig
from hetlm_jax.data.ownership import owners
from hetlm_jax.data.sequences import build_sequences, history_windows, target_windows
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.errors import HetlmError
from hetlm_jax.model import PageLM, init_params
from hetlm_jax.train.batches import ClusterBatches, ScoringBatches, ShardedBatches, add_by_user, scored_users
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.split import model_params
from hetlm_jax.train.step import packed_loss_mask, token_nll


def _seqs(n_users=50):
  table, _ = markov_events(n_users=n_users, n_groups=2, n_pages=8, sessions=2, session_len=5)
  tok = PageTokenizer.fit(table["page"])
  return build_sequences(table, tok)[0], tok


def _tokens_per_user(batches, seqs, weighted=False):
  """How many history tokens of each user the round's batches carry (segment id → user), or their weights."""
  counts = np.zeros(seqs.num_users)
  for step in range(batches.steps):
    order = batches.order(step // batches.steps_per_epoch)
    _, segments, weights = batches.batch(step)
    seg = segments[segments > 0] - 1
    np.add.at(counts, batches.owner_X[order[seg]], weights[segments > 0] if weighted else 1)
  return counts


def test_without_balance_every_user_is_seen_exactly_epochs_times_whatever_the_cluster_sizes():
  seqs, _ = _seqs()
  assignment = np.zeros(seqs.num_users, np.int64)
  assignment[:7] = 1  # one small cluster, one large one, one empty
  batches = ClusterBatches(
    seqs, assignment, k=3, batch_size=4, context=12, epochs=3, seed=0, round_index=0, balance=False
  )
  expected = np.minimum(seqs.split - seqs.offsets[:-1], 13)
  np.testing.assert_array_equal(_tokens_per_user(batches, seqs), 3 * expected)
  inputs, segments, _ = batches.batch(0)
  assert inputs.shape == segments.shape == (3, 4, 13)
  assert (segments[2] == 0).all()  # the empty cluster gets only padding


def test_balanced_rows_fill_small_clusters_and_keep_every_users_weight_per_epoch():
  seqs, _ = _seqs()
  assignment = np.zeros(seqs.num_users, np.int64)
  assignment[:7] = 1  # a small cluster: without balance, most of its rows would be padding
  plain = ClusterBatches(
    seqs, assignment, k=2, batch_size=4, context=12, epochs=3, seed=0, round_index=0, balance=False
  )
  balanced = ClusterBatches(seqs, assignment, k=2, batch_size=4, context=12, epochs=3, seed=0, round_index=0)
  assert balanced.steps == plain.steps
  assert plain.padding_fraction() > 0.3 and balanced.padding_fraction() < 0.1
  expected = np.minimum(seqs.split - seqs.offsets[:-1], 13)
  np.testing.assert_allclose(_tokens_per_user(balanced, seqs, weighted=True), 3 * expected, rtol=1e-5)
  seen = _tokens_per_user(balanced, seqs)
  assert (seen[:7] > 3 * expected[:7]).all()  # the small cluster's users cycle, at weight 1/appearances
  assert (seen[7:] >= 3 * expected[7:]).all()  # the largest fills its last rows' ends the same way
  for step in range(balanced.steps):  # no two copies of an example share a segment id
    _, segments, _ = balanced.batch(step)
    order = balanced.order(step // balanced.steps_per_epoch)
    assert len(np.unique(segments[segments > 0])) <= len(order)


def test_packed_rows_hold_each_users_most_recent_history_in_order():
  seqs, _ = _seqs(10)
  batches = ClusterBatches(
    seqs, np.zeros(10, np.int64), k=1, batch_size=64, context=7, epochs=1, seed=3, round_index=0, balance=False
  )
  order = batches.order(0)
  assert sorted(order) == list(range(10))
  inputs, segments, _ = batches.batch(0)
  stream, seg_stream = inputs[0].reshape(-1), segments[0].reshape(-1)
  for rank, user in enumerate(order):
    window, valid = history_windows(seqs, np.array([user]), 7)
    np.testing.assert_array_equal(stream[seg_stream == rank + 1], window[0][valid[0]])


def test_packed_segments_score_exactly_as_if_each_were_alone():
  cfg = ModelConfig(vocab_size=20, context=15, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0)
  model, params = PageLM(cfg), init_params(cfg, jax.random.key(0))
  a, b = np.array([2, 5, 6, 7, 8, 9]), np.array([2, 11, 12, 13, 14])
  packed = np.zeros((1, 16), np.int32)
  packed[0, :6], packed[0, 6:11] = a, b
  segments = np.zeros((1, 16), np.int32)
  segments[0, :6], segments[0, 6:11] = 1, 2
  nll = np.asarray(token_nll(model, params, packed, segments))[0]
  mask = np.asarray(packed_loss_mask(segments))[0]
  alone_a = np.asarray(token_nll(model, params, a[None]))[0]
  alone_b = np.asarray(token_nll(model, params, b[None]))[0]
  np.testing.assert_allclose(nll[mask], np.concatenate([alone_a, alone_b]), rtol=1e-5, atol=1e-6)
  assert mask.sum() == 5 + 4  # no prediction across the segment boundary or into padding


def test_packed_scoring_equals_scoring_each_user_alone():
  seqs, tok = _seqs(30)
  cfg = Config(
    model=ModelConfig(vocab_size=tok.vocab_size, context=12, d_model=16, n_layers=1, n_heads=2, d_ff=32),
    train=TrainConfig(batch_size=4, eval_batch_size=8),
  )
  trainer = Trainer(cfg, 2)
  params = trainer.init_state().params
  for part, windows in [("history", history_windows), ("target", target_windows)]:
    nll_KxU, tokens_U = trainer.score(params, seqs, part)
    inputs, mask = windows(seqs, np.arange(seqs.num_users), 12)
    mask = mask[:, 1:] if part == "history" else mask
    np.testing.assert_array_equal(tokens_U, mask.sum(axis=1))
    for k in range(2):
      p_k = model_params(params, k)
      alone = np.where(mask, np.asarray(token_nll(PageLM(cfg.model), p_k, inputs)), 0).sum(axis=1)
      np.testing.assert_allclose(nll_KxU[k], alone, rtol=1e-5)


def test_soft_weights_put_each_user_in_every_likely_cluster_with_its_responsibility():
  seqs, _ = _seqs(30)
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.ones(3), size=seqs.num_users)
  weights[:5] = [1.0, 0.0, 0.0]  # below MIN_WEIGHT in clusters 1 and 2: not there at all
  batches = ClusterBatches(
    seqs, weights.argmax(1), k=3, batch_size=4, context=12, epochs=2, seed=0, round_index=0, weights_UxK=weights
  )
  mass = np.zeros((seqs.num_users, 3))
  for step in range(batches.steps):
    _, segments, token_w = batches.batch(step)
    order = batches.order(step // batches.steps_per_epoch)
    for c in range(3):
      real = segments[c] > 0
      np.add.at(mass[:, c], batches.owner_X[order[segments[c][real] - 1]], token_w[c][real])
  history_U = np.minimum(seqs.split - seqs.offsets[:-1], 13)
  expected = 2 * weights * history_U[:, None] * (weights >= ClusterBatches.MIN_WEIGHT)
  np.testing.assert_allclose(mass, expected, rtol=1e-5)
  assert (mass[:5, 1:] == 0).all()


def test_scoring_batches_cover_every_window_once_and_their_users_are_counted_from_the_batch_alone():
  seqs, _ = _seqs(200)
  batches = ScoringBatches(seqs, "target", 9, 4)  # narrow rows: many batches, windows of several users each
  assert batches.num_batches > 5
  seen, tokens_U, sums_UxF = [], np.zeros(seqs.num_users, np.int64), np.zeros((seqs.num_users, 2))
  for i in range(batches.num_batches):
    tokens, segments, mask, owner = batches.batch(i)
    seen += list(np.unique(segments[segments > 0]) - 1)
    users_R, local_BxT, count_R = scored_users(mask, owner)
    assert (users_R[local_BxT[mask]] == owner[:, 1:][mask]).all() and (local_BxT[~mask] == -1).all()
    tokens_U[users_R] += count_R
    owner_N = owner[owner >= 0]
    add_by_user(sums_UxF, owner_N, np.stack([np.ones(len(owner_N)), owner_N], 1))
  assert sorted(seen) == list(range(len(batches.owner_W)))  # every window in exactly one batch
  assert (tokens_U == seqs.target_lengths).all()  # every target token scored once, for its user
  assert (sums_UxF[:, 0] == batches.length_U).all() and (
    sums_UxF[:, 1] == np.arange(seqs.num_users) * batches.length_U
  ).all()


def _whole_epoch(b, epoch):
  """The epoch's batches as they were first built, every token of the epoch at once: the reference `batch` must
  equal, built a block at a time."""
  order = b.order(epoch)
  cluster, length = b.cluster_X[order], b.lengths_X[order]
  end = np.cumsum(length)
  base = np.zeros(b.k + 1, np.int64)
  np.add.at(base, cluster + 1, length)
  start = end - length - np.cumsum(base)[cluster]
  copy = np.repeat(np.arange(len(order)), length)
  offset = np.arange(int(end[-1])) - np.repeat(end - length, length)
  pos = start[copy] + offset
  kept = pos < b.capacity
  copy, offset, pos = copy[kept], offset[kept], pos[kept]
  example = order[copy]
  weight = np.ones(len(copy), np.float32) if b.weight_X is None else b.weight_X[example]
  if b.balance:
    kept_length = np.clip(b.capacity - start, 0, length)
    whole_X = np.bincount(order[kept_length == length], minlength=len(b.cluster_X))
    cut_X = np.zeros(len(b.cluster_X), np.int64)
    cut = (kept_length > 0) & (kept_length < length)
    cut_X[order[cut]] = kept_length[cut]
    weight = weight / (whole_X[example] + (offset < cut_X[example]))
  out = [np.zeros((b.k, b.steps_per_epoch * b.batch_size, b.width), t) for t in (np.int32, np.int32, np.float32)]
  where = (cluster[copy], pos // b.width, pos % b.width)
  for table, values in zip(out, (b.seqs.tokens[b.first_X[example] + offset], copy + 1, weight), strict=True):
    table[where] = values
  return out


def test_batches_built_a_block_at_a_time_equal_the_whole_epoch_packed_at_once():
  seqs, _ = _seqs(60)
  assignment = np.zeros(seqs.num_users, np.int64)
  assignment[:9], assignment[9:12] = 1, 3  # clusters of very different sizes, and cluster 2 empty
  weights = np.random.default_rng(1).dirichlet(np.ones(4), size=seqs.num_users)
  kinds = [
    {"balance": False},
    {"balance": True},
    {"balance": True, "max_repeat": 2},
    {"balance": True, "weights_UxK": weights},
  ]
  for kind in kinds:
    b = ClusterBatches(seqs, assignment, k=4, batch_size=4, context=9, epochs=2, seed=5, round_index=1, **kind)
    reference = {}
    for step in range(b.steps):
      epoch, i = divmod(step, b.steps_per_epoch)
      reference.setdefault(epoch, _whole_epoch(b, epoch))
      expected = [table[:, i * 4 : (i + 1) * 4] for table in reference[epoch]]
      for got, want in zip(b.batch(step), expected, strict=True):
        np.testing.assert_array_equal(got, want)
      # a process's block of the global batch (hosts.local_block): clusters 1-2, rows 1-2, or one row of all
      for clusters, rows in [(slice(1, 3), slice(1, 3)), (slice(None), slice(3, 4))]:
        for got, want in zip(b.batch(step, clusters, rows), expected, strict=True):
          np.testing.assert_array_equal(got, want[clusters, rows])
    filled = sum(float((reference[e][1] > 0).mean()) for e in reference) / len(reference)
    assert abs(b.padding_fraction() - (1 - filled)) < 1e-12


def test_sharded_batches_fill_each_shards_rows_from_its_own_users_and_a_process_builds_only_its_shards(monkeypatch):
  """--data_shards=2: rows 0-1 of every cluster's batch come from the users whose id hashes to shard 0, rows 2-3
  from shard 1; every user still weighs its history once an epoch; a process holding rows 2-3 plans shard 1 alone
  and builds exactly those rows of the whole batches."""
  seqs, _ = _seqs(80)
  assignment = (np.arange(seqs.num_users) % 3 == 0).astype(np.int64)
  shard_U = owners(pa.array(seqs.user_ids.astype(str)), 2)
  assert 0 < shard_U.sum() < seqs.num_users
  args = {"k": 2, "batch_size": 4, "context": 12, "epochs": 2, "seed": 0, "round_index": 0, "shards": 2}
  whole = ShardedBatches(seqs, assignment, **args)
  assert sorted(whole.parts) == [0, 1] and whole.steps_per_epoch >= max(p.steps_per_epoch for p in whole.parts.values())
  weight_U = np.zeros(seqs.num_users)
  for step in range(whole.steps):
    tokens, segments, weights = whole.batch(step)
    assert tokens.shape == (2, 4, 13)
    for s, part in whole.parts.items():
      rows = slice(2 * s, 2 * s + 2)
      seg, w = segments[:, rows], weights[:, rows]
      ids = part.seqs.user_ids[part.owner_X[part.order(step // whole.steps_per_epoch)[seg[seg > 0] - 1]]]
      users = np.searchsorted(seqs.user_ids.astype(str), ids.astype(str))  # the users whose tokens these are
      assert (seqs.user_ids[users] == ids).all() and (shard_U[users] == s).all()
      np.add.at(weight_U, users, w[seg > 0])
  expected = np.minimum(seqs.split - seqs.offsets[:-1], 13)
  np.testing.assert_allclose(weight_U, 2 * expected, rtol=1e-5)
  assert whole.tokens_per_epoch == sum(p.tokens_per_epoch for p in whole.parts.values())
  # A process with rows 2-3 (the other process, with rows 0-1, brings the steps that shard 0 needs).
  monkeypatch.setattr(hosts, "most", lambda value: max(value, whole.steps_per_epoch))
  monkeypatch.setattr(hosts, "gather_arrays", lambda *mine: [list(mine), [np.array([0]), np.array([0])]])
  block = ShardedBatches(seqs, assignment, **args, rows=slice(2, 4))
  assert list(block.parts) == [1] and block.parts[1].seqs.num_users == int(shard_U.sum())
  for step in range(whole.steps):
    for got, expected in zip(block.batch(step, rows=slice(2, 4)), whole.batch(step), strict=True):
      np.testing.assert_array_equal(got, expected[:, 2:4])


def test_with_own_users_a_process_fills_its_rows_from_every_user_it_holds_whatever_their_hash(monkeypatch):
  """--own_users: a process's users are its shard, also when they came to it by its parts (--parts_by_user) and
  not by their hash; a process whose rows are another shard's is refused."""
  seqs, _ = _seqs(40)
  assert len(set(owners(pa.array(seqs.user_ids.astype(str)), 2))) == 2  # users of both hashes
  monkeypatch.setattr(hosts, "own_users", lambda: True)
  monkeypatch.setattr(hosts, "share", lambda: (1, 2))
  args = {"k": 2, "batch_size": 4, "context": 12, "epochs": 1, "seed": 0, "round_index": 0, "shards": 2}
  block = ShardedBatches(seqs, np.zeros(seqs.num_users, np.int64), **args, rows=slice(2, 4))
  assert list(block.parts) == [1] and block.parts[1].seqs.num_users == seqs.num_users
  with pytest.raises(HetlmError, match="not its own users' shard"):
    ShardedBatches(seqs, np.zeros(seqs.num_users, np.int64), **args, rows=slice(0, 2))
