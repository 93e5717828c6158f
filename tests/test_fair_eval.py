"""The evaluation is fair to every model: paired negatives, a training-only vocabulary, the history posterior
of the mixture, and the headline table of report.md."""

import numpy as np
import pytest

from hetlm_jax.data.sequences import build_sequences
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.eval import metrics as M
from hetlm_jax.eval.evaluate import EvalOptions, _ranking, first_page_index
from synthetic import markov_events


@pytest.fixture(scope="module")
def wide():
  """60 users over 150 pages, each touching at most 24: every user has 100 eligible negatives."""
  table, _ = markov_events(n_users=60, n_groups=2, n_pages=150)
  tok = PageTokenizer.fit(table["page"])
  seqs, _ = build_sequences(table, tok)
  return seqs, tok


def test_sampled_negatives_do_not_depend_on_how_users_are_batched(wide):
  seqs, tok = wide
  rng = np.random.default_rng(0)
  logp_UxV = rng.normal(size=(seqs.num_users, tok.vocab_size))
  # The true page near the top, so its rank among 100 negatives (and NDCG) moves with any other draw.
  true_U = seqs.tokens[first_page_index(seqs)]
  logp_UxV[np.arange(seqs.num_users), true_U] = np.quantile(logp_UxV[:, tok.num_specials:], 0.95, axis=1)
  opts = EvalOptions(seed=3)
  by_cluster = _ranking(lambda users: logp_UxV[users], seqs, tok, opts, 5, "hetlm",
                        groups_U=rng.integers(0, 3, seqs.num_users))
  in_order = _ranking(lambda users: logp_UxV[users], seqs, tok, opts, 16, "baseline")
  candidate_V = np.arange(tok.vocab_size) >= tok.num_specials
  neg_UxN, ok_U = M.sample_negatives(seqs, candidate_V, 100, seed=3, exclude_U=true_U)
  expected = M.negatives_ranking_metrics(logp_UxV, true_U, neg_UxN, ok_U, candidate_V)
  assert ok_U.all() and len(np.unique(expected["rank"])) > 3
  for key in ("hr@10", "ndcg@10"):
    np.testing.assert_array_equal(by_cluster[f"{key}_sampled"], in_order[f"{key}_sampled"])
    np.testing.assert_array_equal(by_cluster[f"{key}_sampled"], expected[key])
