"""The split by user (--test_users): whole sequences, sliding windows, the no-end-marker score and the
mixture likelihood of new users."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events

from hetlm_jax.cluster.validation import validation_slice
from hetlm_jax.config import ClusterConfig, Config, DataConfig, ModelConfig, TrainConfig
from hetlm_jax.data.ownership import user_keys, user_uniform
from hetlm_jax.data.prepare import Prepared
from hetlm_jax.data.sequences import (
  UserSequences,
  all_windows,
  build_sequences,
  spare_users,
  split_order,
  split_users,
  user_order,
)
from hetlm_jax.data.tokenizer import BOS, EOS, PageTokenizer
from hetlm_jax.eval.baselines import Markov, MarkovMixture, Popularity
from hetlm_jax.eval.new_users import last_page_view
from hetlm_jax.main import cli
from hetlm_jax.model import PageLM
from hetlm_jax.pipeline import prepare_data, train_and_evaluate
from hetlm_jax.train.batches import prompts
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.split import model_params


def _seqs(lengths, splits):
  """Users with tokens 4, 5, 6, ... (one flat run), each split at the given offset from its start."""
  offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
  tokens = (4 + np.arange(offsets[-1]) % 10).astype(np.int32)
  tokens[offsets[:-1]] = BOS
  return UserSequences(
    user_ids=np.array([f"u{i}" for i in range(len(lengths))], object),
    tokens=tokens,
    offsets=offsets,
    split=offsets[:-1] + np.asarray(splits),
    n_sessions=np.ones(len(lengths), np.int32),
  )


def _predicted(seqs, part, width):
  """How often each token is scored, over all windows of `part`, and whether every window fits."""
  owner_W, start_W, length_W, scored_W = all_windows(seqs, part, width)
  count_N = np.zeros(seqs.num_tokens, np.int64)
  for u, s, n, first in zip(owner_W, start_W, length_W, scored_W):
    assert 1 <= n <= width and seqs.offsets[u] <= s and s + n <= seqs.offsets[u + 1]
    assert s < first <= s + n  # the first scored token has some context in its window
    count_N[first : s + n] += 1
  return count_N


@pytest.mark.parametrize("width", [4, 5, 9])
def test_windows_score_every_history_and_target_token_exactly_once(width):
  seqs = _seqs([3, 10, 25, 7, 40], [1, 9, 5, 6, 30])
  in_history_N = np.zeros(seqs.num_tokens, bool)
  in_target_N = np.zeros(seqs.num_tokens, bool)
  for u in range(seqs.num_users):
    in_history_N[seqs.offsets[u] + 1 : seqs.split[u]] = True  # every history token but the opening BOS
    in_target_N[seqs.split[u] : seqs.offsets[u + 1]] = True
  np.testing.assert_array_equal(_predicted(seqs, "history", width), in_history_N)
  np.testing.assert_array_equal(_predicted(seqs, "target", width), in_target_N)


def test_long_targets_are_scored_in_full_with_context_from_earlier_windows():
  cfg = Config(
    model=ModelConfig(vocab_size=14, context=7, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
    train=TrainConfig(eval_batch_size=8),
  )
  trainer = Trainer(cfg, 1)
  state = trainer.init_state()
  seqs = _seqs([30, 5], [1, 3])
  nll_KxU, tokens_U = trainer.score(state.params, seqs, "target")
  np.testing.assert_array_equal(tokens_U, seqs.target_lengths)
  # By hand: each target token from the tokens before it in the one window that scores it.
  model = PageLM(cfg.model)
  params = model_params(state.params, 0)
  _, start_W, length_W, scored_W = all_windows(seqs, "target", 8)
  expected = 0.0
  for start, length, first in zip(start_W[:-1], length_W[:-1], scored_W[:-1]):  # user 0's windows
    for pos in range(first, start + length):
      logits = model.apply({"params": params}, jnp.asarray(seqs.tokens[start:pos][None]))
      expected -= float(jax.nn.log_softmax(logits[0, -1])[seqs.tokens[pos]])
  np.testing.assert_allclose(nll_KxU[0, 0], expected, rtol=1e-4)


def test_pages_only_scores_each_page_given_that_the_sequence_goes_on():
  cfg = Config(
    model=ModelConfig(vocab_size=14, context=15, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
    train=TrainConfig(eval_batch_size=8),
  )
  trainer = Trainer(cfg, 1)
  params = trainer.init_state().params
  seqs = _seqs([6], [1])
  seqs.tokens[5] = EOS  # BOS p p p p EOS
  nll_KxU, tokens_U = trainer.score(params, seqs, "target", pages_only=True)
  assert tokens_U[0] == 4
  logits = PageLM(cfg.model).apply({"params": model_params(params, 0)}, jnp.asarray(seqs.tokens[None, :5]))
  logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
  cont = np.log(1 - np.exp(logp[:, [0, BOS, EOS]]).sum(axis=1))
  expected = -sum(logp[t, seqs.tokens[t + 1]] - cont[t] for t in range(4))
  np.testing.assert_allclose(nll_KxU[0, 0], expected, rtol=1e-4)
  with_end, tokens_with_end = trainer.score(params, seqs, "target")
  assert tokens_with_end[0] == 5 and with_end[0, 0] > nll_KxU[0, 0]


def test_baselines_without_end_marker_renormalise_over_pages():
  # Chains BOS a b EOS / BOS a a EOS; alpha tiny so the counts speak: after a, a/b/EOS are 1/3 each.
  a, b = 4, 5
  tokens = np.array([BOS, a, b, EOS, BOS, a, a, EOS], np.int32)
  train = UserSequences(
    np.array(["x", "y"], object), tokens, np.array([0, 4, 8]), np.array([4, 8]), np.ones(2, np.int32)
  )
  test = UserSequences(
    np.array(["z"], object), np.array([BOS, a, b, EOS], np.int32), np.array([0, 4]), np.array([1]), np.ones(1, np.int32)
  )
  markov = Markov(alpha=1e-9).fit(train, 6)
  nll, n = markov.target_nll(test, pages_only=True)
  # p(a | BOS) = 1; p(b | a, not the end) = (1/3) / (2/3).
  assert n[0] == 2
  np.testing.assert_allclose(nll[0], -np.log(1.0) - np.log(0.5), atol=1e-6)
  nll_end, n_end = markov.target_nll(test)
  np.testing.assert_allclose(nll_end[0], -np.log(1 / 3), atol=1e-6)  # p(a | BOS) = p(EOS | b) = 1
  assert n_end[0] == 3
  pop = Popularity(alpha=1e-9).fit(train, 6)  # a 3/6, b 1/6, EOS 2/6
  nll, n = pop.target_nll(test, pages_only=True)
  np.testing.assert_allclose(nll[0], -np.log(3 / 4) - np.log(1 / 4), atol=1e-6)
  one = MarkovMixture(k=1, iters=2, alpha=1e-9).fit(train, 6)
  np.testing.assert_allclose(
    one.target_nll(test, pages_only=True)[0], markov.target_nll(test, pages_only=True)[0], atol=1e-6
  )


def test_split_users_follows_the_seeded_permutation_and_keeps_whole_sequences():
  rows = [(u, t, p) for u, pages in enumerate(["a", "ab", "abc", "b", "ba", "c"]) for t, p in enumerate(pages)]
  table = pa.table({"user_id": [r[0] for r in rows], "timestamp": [r[1] for r in rows], "page": [r[2] for r in rows]})
  tok = PageTokenizer.fit(table["page"])
  seqs, _ = build_sequences(table, tok, holdout="none")
  assert seqs.num_users == 6  # one-page users are kept: their sequence is BOS page EOS
  np.testing.assert_array_equal(seqs.lengths, [3, 4, 5, 3, 4, 3])
  assert (seqs.tokens[seqs.offsets[1:] - 1] == EOS).all()
  train, test = split_users(seqs, 3, 2, seed=0)
  perm = np.random.default_rng(0).permutation(6)
  assert list(train.user_ids) == [str(u) for u in perm[:3]]
  assert list(test.user_ids) == [str(u) for u in perm[3:5]]
  np.testing.assert_array_equal(train.split, train.offsets[1:])  # all history
  np.testing.assert_array_equal(test.split, test.offsets[:-1] + 1)  # all target but the BOS
  rest, _ = split_users(seqs, 0, 2, seed=0)
  assert list(rest.user_ids) == [str(u) for u in perm[2:]]


def test_a_test_offset_keeps_one_test_set_across_training_sizes():
  perm = np.random.default_rng(3).permutation(20)
  for n_train in (0, 2, 5, 9):  # -1 is today's split: the test users follow the training users
    rest, test = split_order(20, n_train, 4, 3)
    np.testing.assert_array_equal(test, perm[n_train : n_train + 4])
    np.testing.assert_array_equal(rest[:n_train] if n_train else rest, perm[:n_train] if n_train else perm[4:])
  others = np.r_[perm[:6], perm[10:]]
  for n_train in (0, 2, 5, 9):  # the test users at position 6, whatever trains
    rest, test = split_order(20, n_train, 4, 3, test_offset=6)
    np.testing.assert_array_equal(test, perm[6:10])
    np.testing.assert_array_equal(rest, others)
    spare = spare_users(20, n_train, 4, 2, 3, test_offset=6)
    if n_train:  # validation users come next among the others, never from the test set
      np.testing.assert_array_equal(spare, others[n_train : n_train + 2])
    else:
      assert spare is None


def test_seeded_user_keys_are_the_ids_alone_and_spread_evenly():
  ids = pa.array([f"user-{i}" for i in range(20_000)])
  keys = user_keys(ids, 3)
  np.testing.assert_array_equal(keys[5_000:5_010], user_keys(ids.slice(5_000, 10), 3))  # no other id needed
  chunked = pa.chunked_array([ids.slice(0, 7), ids.slice(7)])
  np.testing.assert_array_equal(user_keys(chunked, 3), keys)
  assert (user_keys(ids, 4) != keys).mean() > 0.999 and (user_keys(ids, 3, 7) != keys).mean() > 0.999
  u = user_uniform(ids, 3)
  assert u.min() >= 0 and u.max() < 1
  np.testing.assert_allclose(np.histogram(u, bins=10, range=(0, 1))[0], 2_000, rtol=0.1)  # ~0.7% sd a bin
  for i in (0, 17, 19_999):  # numpy's vectorised keys against the definition, in plain integers
    assert keys[i] == _key_by_hand(ids[i].as_py(), 3)
  assert user_keys(pa.array(["a"]), 0, 7)[0] == _key_by_hand("a", 0, 7)


def _key_by_hand(user_id: str, *seeds: int) -> int:
  """64-bit FNV-1a of the id's UTF-8 bytes, then for each seed: add (seed + 1) x the golden gamma, splitmix64."""
  m, gamma = 2**64 - 1, 0x9E3779B97F4A7C15
  x = 0xCBF29CE484222325
  for byte in user_id.encode():
    x = ((x ^ byte) * 0x100000001B3) & m
  for seed in seeds:
    x = (x + seed * gamma + gamma) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    x ^= x >> 31
  return x


def test_hash_split_places_users_by_their_ids_alone_whatever_the_other_users():
  ids = np.array([f"u{i:03d}" for i in range(200)], object)
  order = user_order(ids, 5, "hash")
  np.testing.assert_array_equal(order, np.argsort(user_keys(pa.array(ids), 5)))
  subset = np.sort(np.random.default_rng(0).choice(200, 120, replace=False))
  # in a log of only some of the users, the rest keep their order (the permutation's does not)
  kept = order[np.isin(order, subset)]
  np.testing.assert_array_equal(subset[user_order(ids[subset], 5, "hash")], kept)
  perm_kept = user_order(ids, 5)[np.isin(user_order(ids, 5), subset)]
  assert (subset[user_order(ids[subset], 5)] != perm_kept).any()


def test_hash_split_of_a_log_in_any_order_holds_out_the_users_with_the_smallest_keys(tmp_path):
  table, _ = markov_events(n_users=60, n_groups=2, n_pages=6, sessions=2, session_len=4)
  path, shuffled = tmp_path / "log.parquet", tmp_path / "shuffled.parquet"
  pq.write_table(table, path)
  pq.write_table(table.take(np.random.default_rng(1).permutation(table.num_rows)), shuffled)
  data = {"test_users": 10, "train_users": 30, "split": "hash", "split_seed": 2}
  runs = [
    prepare_data(Config(data=DataConfig(path=str(p), **data), train=TrainConfig(val_frac=0.2)))
    for p in (path, shuffled)
  ]
  ids = pa.array(sorted({str(u) for u in table["user_id"].to_pylist()}))
  ranked = np.asarray(ids.to_pylist(), object)[np.argsort(user_keys(ids, 2), kind="stable")]
  for prepared in runs:
    assert sorted(prepared.test_seqs.user_ids) == sorted(ranked[30:40])  # test right after the 30 training users
    assert sorted(prepared.seqs.user_ids) == sorted(ranked[:30])
    assert sorted(prepared.val_seqs.user_ids) == sorted(ranked[40:46])  # val_frac x train_users, after the test


def test_hash_split_in_time_draws_each_validation_user_from_its_id():
  table, _ = markov_events(n_users=300, n_groups=2, n_pages=6, sessions=2, session_len=4)
  tok = PageTokenizer.fit(table["page"])
  seqs = build_sequences(table, tok)[0]
  cfg = Config(data=DataConfig(split="hash"), train=TrainConfig(val_frac=0.25, seed=4))
  val_ids = lambda s: set(validation_slice(cfg, _prepared(s, tok))[1].seqs.user_ids)
  every = val_ids(seqs)
  assert 0.15 * 300 < len(every) < 0.35 * 300
  half = seqs.subset(np.arange(0, 300, 2))
  assert val_ids(half) == every & set(half.user_ids)  # the same users, drawn without the others


def _prepared(seqs, tok):
  return Prepared(seqs, tok, {}, 0.0, False)


def test_a_whole_sequence_prompts_a_new_session():
  seqs = _seqs([5], [5])  # split by user: no target, the whole sequence is history
  seqs.tokens[4] = EOS
  prompt_BxL, pad_B = prompts(seqs, np.array([0]), 8)
  np.testing.assert_array_equal(prompt_BxL[0, pad_B[0] :], np.r_[seqs.tokens[:5], BOS])


def test_last_page_view_splits_before_each_users_last_page():
  tokens = np.array([BOS, 4, EOS, BOS, 4, 5, EOS, BOS, 6, EOS, BOS, 7, EOS], np.int32)
  seqs = UserSequences(
    np.array(["a", "b", "c"], object),
    tokens,
    np.array([0, 3, 7, 13]),
    np.array([1, 4, 8]),
    np.array([1, 1, 2], np.int32),
  )
  users, view = last_page_view(seqs)
  np.testing.assert_array_equal(users, [1, 2])  # user a has one page: nothing to rank
  assert [int(view.tokens[s]) for s in view.split] == [5, 7]
  np.testing.assert_array_equal(view.split - view.offsets[:-1], [2, 4])


@pytest.fixture(scope="module")
def new_users_run(tmp_path_factory):
  table, _ = markov_events(n_users=160, n_groups=2, n_pages=8, sessions=1, session_len=10)
  path = tmp_path_factory.mktemp("data") / "log.parquet"
  import pyarrow.parquet as pq

  pq.write_table(table, path)
  workdir = tmp_path_factory.mktemp("run")
  cfg = Config(
    model=ModelConfig(context=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
    train=TrainConfig(batch_size=16, epochs=2, eval_batch_size=64),
    data=DataConfig(path=str(path), test_users=40, train_users=100),
    cluster=ClusterConfig(k=2, rounds=2, init="random", soft=True),
  )
  return cfg, workdir, train_and_evaluate(cfg, workdir)


def test_new_users_eval_scores_the_mixture_likelihood_and_pools_bits(new_users_run):
  cfg, workdir, report = new_users_run
  on_disk = json.loads((workdir / "eval.json").read_text())
  assert on_disk["protocol"] == "new_users" and on_disk["n_users"] == 40 and on_disk["train_users"] == 100
  for model in ("hetlm", "single", "single_matched", "markov", "markov_mixture", "popularity"):
    assert set(on_disk["bits_per_token"][model]) == {"no_end", "with_end"}
    for metric in ("nll", "nll_no_end", "hr@10", "ndcg@10"):
      assert np.isfinite(on_disk["models"][model][metric]["mean"]), (model, metric)
  assert on_disk["test_tokens"] == {"with_end": 40 * 11, "no_end": 40 * 10}
  # HeTLM's per-user NLL is log Σ_k π_k p_k(sequence), recomputed here from the saved models; π is the mean
  # of the saved soft-EM responsibilities (--soft), not the share of each user's most likely cluster.
  from hetlm_jax.pipeline import load_run, trained_families

  prepared = prepare_data(cfg)
  family = trained_families(workdir, prepared.seqs)["hetlm"]
  nll_KxU, tokens_U = family.trainer.score(family.params, prepared.test_seqs, "target")
  share = load_run(workdir).weights.mean(axis=0)
  mix_U = -np.log((share[:, None] * np.exp(-nll_KxU)).sum(axis=0)) / tokens_U
  np.testing.assert_allclose(mix_U.mean(), on_disk["models"]["hetlm"]["nll"]["mean"], rtol=1e-5)
  bits = (mix_U * tokens_U).sum() / tokens_U.sum() / np.log(2)
  np.testing.assert_allclose(bits, on_disk["bits_per_token"]["hetlm"]["with_end"], rtol=1e-5)
  assert "bits per token" in (workdir / "report.md").read_text()


@pytest.mark.parametrize(
  "flags,needle",
  [
    (["--train_users=10"], "--train_users needs --test_users"),
    (["--test_users=5", "--k=auto"], "--k=auto"),
    (["--test_users=100000"], "too few"),
    (["--test_offset=3"], "--test_offset needs --test_users"),
    (
      ["--test_users=50", "--test_offset=999999"],
      "too few for --train_users=0 and --test_users=50, --test_offset=999999",
    ),
  ],
)
def test_split_by_user_flags_are_checked_before_anything_is_written(tmp_path, capsys, flags, needle):
  workdir = tmp_path / "run"
  assert cli(["hetlm", "train", f"--workdir={workdir}", "--flagfile=configs/tiny.flags", *flags]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and needle in err
  assert not workdir.exists()


def test_one_page_users_are_scored_and_leave_nothing_to_rank(tmp_path):
  import pyarrow.parquet as pq

  path = tmp_path / "one_page.parquet"
  pq.write_table(
    pa.table({"user_id": list(range(40)), "timestamp": [0] * 40, "page": [f"p{u % 3}" for u in range(40)]}), path
  )
  cfg = Config(
    model=ModelConfig(context=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, dropout=0.0),
    train=TrainConfig(batch_size=8, epochs=1, eval_batch_size=16),
    data=DataConfig(path=str(path), test_users=10),
    cluster=ClusterConfig(k=2, rounds=1, init="random"),
  )
  report = train_and_evaluate(cfg, tmp_path / "run")
  assert report["ranked_users"] == 0 and report["test_tokens"] == {"with_end": 20, "no_end": 10}
  on_disk = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert on_disk["models"]["hetlm"]["hr@10"]["mean"] is None and on_disk["models"]["hetlm"]["nll"]["mean"] > 0
