"""Ranking, sampled ranking, summaries, paired bootstrap, session similarity and outcome metrics."""

import numpy as np
import pytest
from synthetic import markov_events

from hetlm_jax.data.sequences import build_sequences
from hetlm_jax.data.tokenizer import EOS, UNK, PageTokenizer
from hetlm_jax.eval.metrics import (
  edit_similarity,
  jaccard,
  length_error,
  negatives_ranking_metrics,
  outcome_auc,
  outcome_f1,
  paired_bootstrap,
  ranking_metrics,
  rouge_l_f1,
  sample_negatives,
  sampled_ranking_metrics,
  summarize,
)

CANDIDATE_V = np.arange(20) >= 4  # pages are ids 4..19


def test_ranking_metrics_by_hand():
  logp_UxV = np.tile(-np.arange(20, dtype=np.float64), (4, 1))  # page 4 best, then 5, 6, ...
  logp_UxV[:, 0] = 10.0  # PAD scores highest but is no candidate
  true_U = np.array([6, 4, 19, EOS])
  out = ranking_metrics(logp_UxV, true_U, CANDIDATE_V)
  # Ranks: page 6 behind pages 4 and 5 -> 3; page 4 -> 1; page 19 -> 16; EOS is excluded.
  assert out["valid"].tolist() == [True, True, True, False]
  np.testing.assert_array_equal(out["rank"], [3, 1, 16, np.nan])
  np.testing.assert_array_equal(out["hr@1"], [0, 1, 0, np.nan])
  np.testing.assert_array_equal(out["hr@5"], [1, 1, 0, np.nan])
  np.testing.assert_array_equal(out["hr@10"], [1, 1, 0, np.nan])
  np.testing.assert_allclose(out["ndcg@10"], [0.5, 1.0, 0.0, np.nan])  # 1/log2(3+1) = 0.5
  np.testing.assert_allclose(out["mrr"], [1 / 3, 1.0, 1 / 16, np.nan])
  assert summarize(out["mrr"])["mean"] == pytest.approx((1 / 3 + 1 + 1 / 16) / 3)


def test_ranking_ties_are_pessimistic():
  logp_UxV = np.zeros((2, 20))
  logp_UxV[0, [5, 7]] = 1.0  # the true page 7 ties with page 5
  out = ranking_metrics(logp_UxV, np.array([7, 4]), CANDIDATE_V)
  # User 1: all 16 pages tie, so the true page comes last.
  np.testing.assert_array_equal(out["rank"], [2, 16])
  np.testing.assert_allclose(out["ndcg@10"], [1 / np.log2(3), 0.0])
  np.testing.assert_allclose(out["mrr"], [0.5, 1 / 16])


def test_an_unknown_target_page_is_a_miss_not_left_out():
  """UNK is a real page no model knows: with `unknown` it ranks last (SASRec counts such a user), without it the
  user is left out, as EOS always is."""
  logp_UxV = np.tile(-np.arange(20, dtype=np.float64), (3, 1))
  logp_UxV[:, UNK] = 5.0  # scoring UNK high must not turn it into a hit
  true_U = np.array([4, UNK, EOS])
  out = ranking_metrics(logp_UxV, true_U, CANDIDATE_V, unknown=UNK)
  assert out["valid"].tolist() == [True, True, False]
  np.testing.assert_array_equal(out["rank"], [1, 17, np.nan])  # behind all 16 pages
  np.testing.assert_array_equal(out["hr@10"], [1, 0, np.nan])
  np.testing.assert_array_equal(out["ndcg@10"], [1, 0, np.nan])
  assert summarize(out["hr@10"])["mean"] == 0.5
  assert ranking_metrics(logp_UxV, true_U, CANDIDATE_V)["valid"].tolist() == [True, False, False]
  neg_UxN = np.tile(np.arange(5, 10), (3, 1))
  ok_U = np.array([True, True, True])
  out = negatives_ranking_metrics(logp_UxV, true_U, neg_UxN, ok_U, CANDIDATE_V, unknown=UNK)
  np.testing.assert_array_equal(out["rank"], [1, 6, np.nan])  # behind all 5 negatives
  out = negatives_ranking_metrics(logp_UxV, true_U, neg_UxN, np.array([True, False, True]), CANDIDATE_V, unknown=UNK)
  assert out["valid"].tolist() == [True, False, False]  # too few negatives still leaves a user out


@pytest.fixture(scope="module")
def wide():
  """30 users over 150 pages: each touches at most 24, leaving > 100 eligible negatives."""
  table, _ = markov_events(n_users=30, n_groups=2, n_pages=150)
  tok = PageTokenizer.fit(table["page"])
  seqs, _ = build_sequences(table, tok)
  candidate_V = np.arange(tok.vocab_size) >= tok.num_specials
  return seqs, candidate_V


def check_negatives(seqs, candidate_V, neg_UxN, n):
  for u in range(seqs.num_users):  # checks only
    row = neg_UxN[u]
    assert len(np.unique(row)) == n
    assert candidate_V[row].all()
    assert not np.isin(row, seqs.tokens[seqs.offsets[u] : seqs.offsets[u + 1]]).any()


def test_sampled_negatives_are_distinct_unseen_and_seeded(wide):
  seqs, candidate_V = wide
  neg_UxN, ok_U = sample_negatives(seqs, candidate_V, 100, seed=0)
  assert ok_U.all() and neg_UxN.shape == (seqs.num_users, 100)
  check_negatives(seqs, candidate_V, neg_UxN, 100)
  again, _ = sample_negatives(seqs, candidate_V, 100, seed=0)
  other, _ = sample_negatives(seqs, candidate_V, 100, seed=1)
  np.testing.assert_array_equal(neg_UxN, again)
  assert not np.array_equal(np.sort(neg_UxN, axis=1), np.sort(other, axis=1))
  # The exact fallback (no redraw rounds at all) obeys the same rules.
  exact, _ = sample_negatives(seqs, candidate_V, 100, seed=0, max_rounds=0)
  check_negatives(seqs, candidate_V, exact, 100)


def test_negatives_by_id_are_each_users_own_whatever_the_other_users(wide):
  """by_id (--split=hash, --own_users): a user's negatives come from its id, so a process holding a share of the
  users in another order draws the same ones; they obey the same rules, through the redraws and the exact fallback."""
  seqs, candidate_V = wide
  neg_UxN, ok_U = sample_negatives(seqs, candidate_V, 100, seed=0, by_id=True)
  assert ok_U.all()
  check_negatives(seqs, candidate_V, neg_UxN, 100)
  share = np.random.default_rng(0).permutation(seqs.num_users)[: seqs.num_users // 3]
  again, _ = sample_negatives(seqs.subset(share), candidate_V, 100, seed=0, by_id=True)
  np.testing.assert_array_equal(again, neg_UxN[share])
  other, _ = sample_negatives(seqs, candidate_V, 100, seed=1, by_id=True)
  assert not np.array_equal(np.sort(neg_UxN, axis=1), np.sort(other, axis=1))
  exact, _ = sample_negatives(seqs, candidate_V, 100, seed=0, max_rounds=0, by_id=True)
  check_negatives(seqs, candidate_V, exact, 100)
  exact_share, _ = sample_negatives(seqs.subset(share), candidate_V, 100, seed=0, max_rounds=0, by_id=True)
  np.testing.assert_array_equal(exact_share, exact[share])


def test_sampled_negatives_too_few_candidates_are_invalid(wide):
  seqs, candidate_V = wide
  eligible_U = candidate_V.sum() - np.array(
    [len(np.unique(seqs.tokens[a:b])) for a, b in zip(seqs.offsets[:-1], seqs.offsets[1:])]
  )
  n = int(np.median(eligible_U))
  neg_UxN, ok_U = sample_negatives(seqs, candidate_V, n, seed=0)
  np.testing.assert_array_equal(ok_U, eligible_U >= n)
  assert (neg_UxN[~ok_U] == -1).all()
  check_negatives(seqs.subset(ok_U), candidate_V, neg_UxN[ok_U], n)


def test_sampled_ranking_includes_the_true_item(wide):
  seqs, candidate_V = wide
  u, v = seqs.num_users, len(candidate_V)
  true_U = seqs.tokens[seqs.split + 1]  # the target session's first page, after its BOS
  rows = np.arange(u)
  best_UxV = np.zeros((u, v))
  best_UxV[rows, true_U] = 1.0
  out = sampled_ranking_metrics(best_UxV, true_U, seqs, candidate_V)
  assert out["valid"].all() and (out["rank"] == 1).all() and (out["hr@1"] == 1).all()
  # All scores tie: the true item ranks behind all 100 negatives.
  out = sampled_ranking_metrics(np.zeros((u, v)), true_U, seqs, candidate_V)
  assert (out["rank"] == 101).all() and (out["hr@10"] == 0).all()
  np.testing.assert_allclose(out["mrr"], 1 / 101)
  # Exactly 3 negatives score above the true item -> rank 4.
  logp_UxV = np.random.default_rng(0).normal(size=(u, v))
  neg_UxN, _ = sample_negatives(seqs, candidate_V, 100, seed=7, exclude_U=true_U)
  logp_UxV[rows, true_U] = np.sort(np.take_along_axis(logp_UxV, neg_UxN, axis=1), axis=1)[:, -4]
  logp_UxV[rows, true_U] += 1e-9
  out = sampled_ranking_metrics(logp_UxV, true_U, seqs, candidate_V, seed=7)
  assert (out["rank"] == 4).all() and (out["hr@5"] == 1).all() and (out["hr@1"] == 0).all()
  np.testing.assert_allclose(out["ndcg@10"], 1 / np.log2(5))


def test_session_similarities_by_hand():
  kitten, sitting = np.array([1, 2, 3, 3, 4, 5]), np.array([6, 2, 3, 3, 2, 5, 7])
  gen = [kitten, np.array([], int), np.array([], int), np.array([1, 2, 3])]
  act = [sitting, np.array([], int), np.array([1, 2]), np.array([3, 2, 1])]
  np.testing.assert_allclose(edit_similarity(gen, act), [1 - 3 / 7, 1.0, 0.0, 1 - 2 / 3])
  # Sets {1,2,3,4,5} and {2,3,5,6,7} share 3 of 7.
  np.testing.assert_allclose(jaccard(gen, act), [3 / 7, 1.0, 0.0, 1.0])
  # LCS(kitten, sitting) = "ittn" = 4, so F1 = 2·4 / (6 + 7).
  np.testing.assert_allclose(rouge_l_f1(gen, act), [8 / 13, 1.0, 0.0, 2 / 6])
  np.testing.assert_array_equal(length_error(gen, act), [1, 0, 2, 0])


def reference_levenshtein(x, y):
  d = [[i + j if i * j == 0 else 0 for j in range(len(y) + 1)] for i in range(len(x) + 1)]
  for i in range(1, len(x) + 1):
    for j in range(1, len(y) + 1):
      d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (x[i - 1] != y[j - 1]))
  return d[-1][-1]


def reference_lcs(x, y):
  d = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
  for i in range(1, len(x) + 1):
    for j in range(1, len(y) + 1):
      d[i][j] = d[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(d[i - 1][j], d[i][j - 1])
  return d[-1][-1]


def test_row_vectorised_dynamic_programs_match_the_textbook_ones():
  rng = np.random.default_rng(0)
  gen = [rng.integers(0, 4, rng.integers(0, 12)) for _ in range(60)]
  act = [rng.integers(0, 4, rng.integers(0, 12)) for _ in range(60)]
  for g, a, es, f1 in zip(gen, act, edit_similarity(gen, act), rouge_l_f1(gen, act)):
    longest = max(len(g), len(a))
    assert es == pytest.approx(1 - reference_levenshtein(g, a) / longest if longest else 1.0)
    assert f1 == pytest.approx(2 * reference_lcs(g, a) / (len(g) + len(a)) if longest else 1.0)


def test_summarize_ignores_nan():
  out = summarize(np.array([1.0, 2.0, 3.0, 4.0, np.nan]))
  assert out == pytest.approx({"mean": 2.5, "var": 1.25, "std": np.sqrt(1.25), "p10": 1.3, "p50": 2.5, "p90": 3.7})
  assert all(isinstance(x, float) for x in out.values())
  assert np.isnan(summarize(np.array([np.nan]))["mean"])


def test_paired_bootstrap_covers_known_differences():
  rng = np.random.default_rng(0)
  b_U = rng.normal(size=2000)
  a_U = b_U + 0.3 + 0.1 * rng.normal(size=2000)
  out = paired_bootstrap(a_U, b_U, n_boot=1000, seed=0)
  assert out["mean_diff"] == pytest.approx(0.3, abs=0.01)
  assert out["mean_ci"][0] < 0.3 < out["mean_ci"][1] and out["mean_ci"][0] > 0
  # The shift leaves the variance alone: its CI holds 0 (truth: var(a) - var(b) = 0.01).
  assert out["var_ci"][0] < 0.01 < out["var_ci"][1]
  # a = 1.5 b + noise: var(a) - var(b) = 2.25 + 0.01 - 1 = 1.26 in the population.
  wide_U = 1.5 * b_U + 0.1 * rng.normal(size=2000)
  out = paired_bootstrap(wide_U, b_U, n_boot=1000, seed=0)
  assert out["var_ci"][0] < 1.26 < out["var_ci"][1] and out["var_ci"][0] > 0
  assert out["var_diff"] == pytest.approx(wide_U.var() - b_U.var())
  assert paired_bootstrap(a_U, b_U, seed=3) == paired_bootstrap(a_U, b_U, seed=3)
  # Users missing in either are dropped jointly.
  a_nan = np.append(a_U, np.nan)
  dropped = paired_bootstrap(a_nan, np.append(b_U, 5.0), n_boot=10)
  assert dropped["mean_diff"] == pytest.approx((a_U - b_U).mean())


def test_outcome_auc_and_f1():
  assert outcome_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
  assert np.isnan(outcome_auc(np.array([0.1, 0.4]), np.array([1, 1])))
  assert outcome_f1(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == 0.5
  assert outcome_f1(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
