"""Popularity, Markov and MarkovMixture baselines: hand-computed NLLs, EM, planted-group recovery."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from synthetic import markov_events

from hetlm_jax.data.sequences import UserSequences, build_sequences
from hetlm_jax.data.tokenizer import BOS, EOS, UNK, PageTokenizer
from hetlm_jax.eval.baselines import Markov, MarkovMixture, Popularity

V = 6  # specials 0..3, pages 4 and 5


def seqs_of(users):
  """UserSequences from [(history, target), ...] token lists."""
  tokens = np.concatenate([np.array(h + t, np.int32) for h, t in users])
  lengths = [len(h) + len(t) for h, t in users]
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  split = offsets[:-1] + np.array([len(h) for h, _ in users])
  return UserSequences(
    user_ids=np.array([f"u{i}" for i in range(len(users))], object),
    tokens=tokens,
    offsets=offsets,
    split=split,
    n_sessions=np.ones(len(users), np.int32),
  )


TOY = seqs_of([([BOS, 4, 5, 4], [5, 4]), ([BOS, 4, 4], [5])])


def planted(n_users=150, n_groups=3, seed=0):
  table, group_U = markov_events(n_users=n_users, n_groups=n_groups, seed=seed)
  tok = PageTokenizer.fit(table["page"])
  seqs, _ = build_sequences(table, tok)
  return seqs, group_U, tok.vocab_size


def test_popularity_target_nll_by_hand():
  model = Popularity(alpha=0.1).fit(TOY, V)
  # Predicted history tokens: 4 5 4 | 4 4 -> counts {4: 4, 5: 1} of 5.
  p4, p5 = 4.1 / 5.6, 1.1 / 5.6
  nll_U, n_U = model.target_nll(TOY)
  np.testing.assert_allclose(nll_U, [-np.log(p5) - np.log(p4), -np.log(p5)])
  assert n_U.tolist() == [2, 1] and n_U.dtype == np.int64
  logp_UxV = model.next_token_logprobs(TOY)
  np.testing.assert_allclose(np.exp(logp_UxV[0]), [0.1 / 5.6] * 4 + [p4, p5])


def test_markov_target_nll_by_hand():
  model = Markov(alpha=0.1).fit(TOY, V)
  # Pairs: (BOS,4) x2, (4,5), (5,4), (4,4): row 4 holds {4: 1, 5: 1}, row 5 holds {4: 1}.
  p5_after4, p4_after5 = 1.1 / 2.6, 1.1 / 1.6
  nll_U, _ = model.target_nll(TOY)
  np.testing.assert_allclose(nll_U, [-np.log(p5_after4) - np.log(p4_after5), -np.log(p5_after4)])
  logp_UxV = model.next_token_logprobs(TOY)  # both histories end in page 4
  np.testing.assert_allclose(np.exp(logp_UxV), [[0.1 / 2.6] * 4 + [1.1 / 2.6] * 2] * 2)


@pytest.mark.parametrize("model", [Popularity(), Markov(), MarkovMixture(2, iters=5)])
def test_unseen_tokens_are_finite(model):
  # EOS and UNK never occur in these histories; EOS never follows anything there.
  seqs = seqs_of([([BOS, 4, 5, 4], [UNK, EOS]), ([BOS, 4, 4], [EOS])])
  model.fit(seqs, V)
  nll_U, _ = model.target_nll(seqs)
  logp_UxV = model.next_token_logprobs(seqs)
  assert np.isfinite(nll_U).all() and np.isfinite(logp_UxV).all()
  np.testing.assert_allclose(np.exp(logp_UxV).sum(axis=1), 1.0)


@pytest.mark.parametrize("make", [Popularity, Markov, lambda: MarkovMixture(3, iters=10)])
def test_fit_never_sees_targets_and_next_token_logprobs_add_up_to_target_nll(make):
  seqs, _, v = planted(n_users=60)
  rng = np.random.default_rng(1)
  other = UserSequences(seqs.user_ids, seqs.tokens.copy(), seqs.offsets, seqs.split, seqs.n_sessions)
  is_target = np.zeros(seqs.num_tokens, bool)
  for u in range(seqs.num_users):  # building the fixture only
    is_target[seqs.split[u] : seqs.offsets[u + 1]] = True
  other.tokens[is_target] = rng.integers(4, v, is_target.sum())
  a = make().fit(seqs, v).next_token_logprobs(seqs)
  b = make().fit(other, v).next_token_logprobs(seqs)
  np.testing.assert_allclose(a, b)
  # The target NLL is the sum of the next-token log-probabilities at every target position.
  model = make().fit(seqs, v)
  nll_U, n_U = model.target_nll(seqs)
  assert (n_U == n_U[0]).all()  # every user's target is one whole session here
  rows = np.arange(seqs.num_users)
  logp_sum_U = sum(
    model.next_token_logprobs(seqs, seqs.split + j)[rows, seqs.tokens[seqs.split + j]] for j in range(n_U[0])
  )
  np.testing.assert_allclose(nll_U, -logp_sum_U, rtol=1e-10)
  np.testing.assert_array_equal(model.next_token_logprobs(seqs), model.next_token_logprobs(seqs, seqs.split))
  with pytest.raises(ValueError, match="at_U"):
    model.next_token_logprobs(seqs, seqs.split - 1)


def test_mixture_recovers_planted_markov_groups():
  seqs, group_U, v = planted(n_users=150, n_groups=3)
  mix = MarkovMixture(3, iters=50, seed=0).fit(seqs, v)
  resp_UxK = mix.responsibilities(seqs)
  np.testing.assert_allclose(resp_UxK.sum(axis=1), 1.0)
  assert adjusted_rand_score(group_U, resp_UxK.argmax(axis=1)) >= 0.9
  ll = np.array(mix.history_ll_)
  assert len(ll) == 50 and (np.diff(ll) >= -1e-6 * np.abs(ll[1:])).all()
  objective = np.array(mix.objective_)
  assert (np.diff(objective) >= -1e-9 * np.abs(objective[1:])).all()
  assert ll[-1] > ll[0]
  mix_nll = mix.target_nll(seqs)[0].sum()
  markov_nll = Markov().fit(seqs, v).target_nll(seqs)[0].sum()
  assert mix_nll < markov_nll < Popularity().fit(seqs, v).target_nll(seqs)[0].sum()


def test_a_mixture_started_by_id_fits_the_same_whatever_the_order_of_the_users():
  """by_id: each user's starting responsibilities come from its id, so users in another order (as a job of
  processes holding their own users lays them out) fit the same chains."""
  seqs, _, v = planted(n_users=90, n_groups=3)
  order = np.random.default_rng(1).permutation(seqs.num_users)
  a = MarkovMixture(3, iters=5, seed=0, by_id=True).fit(seqs, v)
  b = MarkovMixture(3, iters=5, seed=0, by_id=True).fit(seqs.subset(order), v)
  np.testing.assert_allclose(b.responsibilities(seqs.subset(order)), a.responsibilities(seqs)[order], rtol=1e-9)
  c = MarkovMixture(3, iters=5, seed=0).fit(seqs.subset(order), v)
  assert not np.allclose(c.responsibilities(seqs.subset(order)), a.responsibilities(seqs)[order])


def test_mixture_nll_matches_brute_force_sequential_posterior():
  rng = np.random.default_rng(3)
  users = []
  for _ in range(7):
    hist = [BOS] + rng.integers(4, V, rng.integers(1, 6)).tolist()
    users.append((hist, rng.integers(3, V, rng.integers(1, 5)).tolist()))
  seqs = seqs_of(users)
  k, alpha, seed = 2, 0.3, 5
  mix = MarkovMixture(k, iters=1, seed=seed, alpha=alpha).fit(seqs, V)
  # One M-step from the seeded initial responsibilities, written out densely.
  resp0 = np.random.default_rng(seed).dirichlet(np.ones(k), size=len(users))
  counts = np.zeros((k, V, V))
  for u, (hist, _) in enumerate(users):
    for a, b in zip(hist[:-1], hist[1:]):
      counts[:, a, b] += resp0[u]
  trans = (counts + alpha) / (counts + alpha).sum(axis=2, keepdims=True)
  pi = resp0.mean(axis=0)
  expected_nll, expected_resp, expected_next = [], [], []
  for hist, target in users:
    log_post = np.log(pi) + sum(np.log(trans[:, a, b]) for a, b in zip(hist[:-1], hist[1:]))
    post = np.exp(log_post - log_post.max())
    expected_resp.append(post / post.sum())
    expected_next.append(np.log(expected_resp[-1] @ trans[:, hist[-1], :]))
    nll, prev = 0.0, hist[-1]
    for t in target:
      post = np.exp(log_post - log_post.max())
      nll -= np.log((post / post.sum()) @ trans[:, prev, t])
      log_post = log_post + np.log(trans[:, prev, t])
      prev = t
    expected_nll.append(nll)
  nll_U, n_U = mix.target_nll(seqs)
  np.testing.assert_allclose(nll_U, expected_nll, rtol=1e-10)
  assert n_U.tolist() == [len(t) for _, t in users]
  np.testing.assert_allclose(mix.responsibilities(seqs), expected_resp, rtol=1e-10)
  np.testing.assert_allclose(mix.next_token_logprobs(seqs), expected_next, rtol=1e-10)
