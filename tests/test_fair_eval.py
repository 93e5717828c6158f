"""The evaluation is fair to every model: paired negatives, a training-only vocabulary, the history posterior
of the mixture, and the headline table of report.md."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events

from hetlm_jax.config import Config, DataConfig
from hetlm_jax.data.sequences import build_sequences
from hetlm_jax.data.tokenizer import UNK, PageTokenizer
from hetlm_jax.eval import metrics as M
from hetlm_jax.eval.evaluate import (
  EvalOptions,
  first_page_index,
  mixture_nll,
  rank_next_pages,
  unknown_targets,
)
from hetlm_jax.eval.report import write_report
from hetlm_jax.pipeline import prepare_data


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
  logp_UxV[np.arange(seqs.num_users), true_U] = np.quantile(logp_UxV[:, tok.num_specials :], 0.95, axis=1)
  opts = EvalOptions(seed=3)
  by_cluster = rank_next_pages(
    lambda users: logp_UxV[users], seqs, tok, opts, 5, "hetlm", groups_U=rng.integers(0, 3, seqs.num_users)
  )
  in_order = rank_next_pages(lambda users: logp_UxV[users], seqs, tok, opts, 16, "baseline")
  candidate_V = np.arange(tok.vocab_size) >= tok.num_specials
  neg_UxN, ok_U = M.sample_negatives(seqs, candidate_V, 100, seed=3, exclude_U=true_U)
  expected = M.negatives_ranking_metrics(logp_UxV, true_U, neg_UxN, ok_U, candidate_V)
  assert ok_U.all() and len(np.unique(expected["rank"])) > 3
  for key in ("hr@10", "ndcg@10"):
    np.testing.assert_array_equal(by_cluster[f"{key}_sampled"], in_order[f"{key}_sampled"])
    np.testing.assert_array_equal(by_cluster[f"{key}_sampled"], expected[key])


def _log(tmp_path, rows):
  """A parquet log of (user, hour, page) rows, one page a minute within the hour."""
  users, hours, pages = zip(*rows)
  ts = [1_600_000_000 + 7200 * h + 60 * i for i, h in enumerate(hours)]
  path = tmp_path / "events.parquet"
  pq.write_table(pa.table({"user_id": list(users), "timestamp": ts, "page": list(pages)}), path)
  return str(path)


def _pages(seqs, tok, part):
  """Page strings of every user's `part` ('history' or 'target')."""
  get = seqs.history if part == "history" else seqs.target
  return [p for u in range(seqs.num_users) for p in tok.decode(get(u))]


def test_pages_seen_only_in_held_out_targets_are_not_in_the_vocabulary(tmp_path):
  path = _log(
    tmp_path,
    [
      # Two sessions: the last one is the target.
      ("a", 0, "home"),
      ("a", 0, "news"),
      ("a", 1, "home"),
      ("a", 1, "target_only"),
      # One session, --holdout=half: history <s> home sport, target sport2 tail_only.
      ("b", 0, "home"),
      ("b", 0, "sport"),
      ("b", 0, "sport2"),
      ("b", 0, "tail_only"),
      # "news" trains once (user a) and is held out once (user c): min_count=2 counts only the first.
      ("c", 0, "home"),
      ("c", 0, "sport"),
      ("c", 1, "news"),
    ],
  )
  cfg = Config(data=DataConfig(path=path, holdout="half"))
  prepared = prepare_data(cfg)
  tok, seqs = prepared.tokenizer, prepared.seqs
  assert set(tok.tokens[tok.num_specials :]) == {"home", "news", "sport"}
  assert _pages(seqs, tok, "target").count("<unk>") == 3  # target_only, sport2, tail_only
  assert "<unk>" not in _pages(seqs, tok, "history") and prepared.stats["pages_never_in_training"] == 3
  # b's ranked page (sport2) is unknown: a miss for the next-page metrics, not a user left out.
  b = list(seqs.user_ids).index("b")
  assert unknown_targets(seqs) == 1 and unknown_targets(seqs, np.arange(seqs.num_users) != b) == 0
  true_U = seqs.tokens[first_page_index(seqs)]
  logp_UxV = np.zeros((seqs.num_users, tok.vocab_size))
  logp_UxV[np.arange(seqs.num_users), true_U] = 1.0  # every true token scores best, UNK included
  ranked = rank_next_pages(lambda users: logp_UxV[users], seqs, tok, EvalOptions(negatives=1), 8, "x")
  last = np.arange(seqs.num_users) == b
  np.testing.assert_array_equal(1 / ranked["mrr"], np.where(last, 4, 1))  # behind all 3 pages
  np.testing.assert_array_equal(ranked["hr@1"], ~last)
  # One negative: a ranks first, b behind it; c has seen every page, so has no negative and is left out.
  c = list(seqs.user_ids).index("c")
  np.testing.assert_allclose(
    ranked["ndcg@10_sampled"], [np.nan if u == c else 1 / np.log2(3) if u == b else 1.0 for u in range(seqs.num_users)]
  )
  rare = prepare_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, min_count=2)))
  assert set(rare.tokenizer.tokens[rare.tokenizer.num_specials :]) == {"home", "sport"}
  assert rare.tokenizer.encode_pages(["news"]).tolist() == [UNK]
  # A given (saved) tokenizer is used as it is.
  every = PageTokenizer.fit(["home", "target_only"])
  again = prepare_data(cfg, every)
  assert again.tokenizer is every and "target_only" in _pages(again.seqs, every, "target")


def test_pages_seen_only_in_test_users_are_not_in_the_vocabulary(tmp_path):
  users = [f"u{i}" for i in range(5)]
  path = _log(tmp_path, [row for u in users for row in ((u, 0, "home"), (u, 0, f"own_{u}"))])
  prepared = prepare_data(Config(data=DataConfig(path=path, test_users=2, split_seed=1)))
  tok, train, test = prepared.tokenizer, prepared.seqs, prepared.test_seqs
  assert set(tok.tokens[tok.num_specials :]) == {"home"} | {f"own_{u}" for u in train.user_ids}
  assert test.num_users == 2
  for u in range(test.num_users):
    assert tok.decode(test.target(u)) == ["home", "<unk>", "</s>"]


def test_mixture_weights_each_model_by_its_posterior_given_the_history_not_the_prior():
  prior_K = np.array([0.9, 0.1])
  # User 0's history is far likelier under model 1; user 1's is equally likely under both.
  history_KxU = np.array([[10.0, 2.0], [0.0, 2.0]])
  target_KxU, tokens_U = np.array([[0.1, 0.1], [5.0, 5.0]]), np.array([2, 2])
  nll_U = mixture_nll(np.log(prior_K), history_KxU, target_KxU, tokens_U)
  post_K = prior_K * np.exp(-history_KxU[:, 0]) / (prior_K * np.exp(-history_KxU[:, 0])).sum()
  by_prior = -np.log(prior_K @ np.exp(-target_KxU[:, 1])) / 2
  np.testing.assert_allclose(nll_U[0], -np.log(post_K @ np.exp(-target_KxU[:, 0])) / 2)
  assert nll_U[0] > 2.0 > 0.2 > by_prior  # model 1's poor target fit dominates, as its posterior does
  np.testing.assert_allclose(nll_U[1], by_prior)  # a history that tells nothing leaves the prior


def _fake_report(metrics, **extra):
  """A report dict as evaluate() makes it: per-user summaries of four models, and HeTLM's paired bootstrap."""
  rng = np.random.default_rng(0)
  per_user = {
    name: {m: rng.normal(loc, 1.0, 50) for m in metrics}
    for name, loc in (("hetlm", 0.0), ("single", 0.5), ("single_matched", 0.3), ("markov", 1.0))
  }
  for values in per_user.values():  # alignment is NaN for users without a generated session
    for m in set(metrics) & {"edit_similarity", "jaccard", "rouge_l_f1"}:
      values[m][30:] = np.nan
  report = {
    "models": {name: {m: M.summarize(v) for m, v in ms.items()} for name, ms in per_user.items()},
    "n_users": 50,
    "bootstrap": {
      f"hetlm-{o}": {m: M.paired_bootstrap(per_user["hetlm"][m], per_user[o][m], 200) for m in metrics}
      for o in ("single", "single_matched")
    },
    **extra,
  }
  return report, {name: ms["nll"] for name, ms in per_user.items()}


def _first_table(text):
  """Rows (lists of cells) of the first table after report.md's intro."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
  return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end]]


def _check_headline(report, rows, metrics):
  header, body = rows[0], rows[2:]
  assert header == [
    "metric",
    "vs",
    "HeTLM mean",
    "other mean",
    "Δ mean [95% CI]",
    "HeTLM var",
    "other var",
    "Δ var [95% CI]",
  ]
  assert [(r[0], r[1]) for r in body] == [(m, o) for m in metrics for o in ("single", "single_matched")]
  for metric, other, h_mean, o_mean, d_mean, h_var, o_var, d_var in body:
    h, o = report["models"]["hetlm"][metric], report["models"][other][metric]
    b = report["bootstrap"][f"hetlm-{other}"][metric]
    assert (h_mean, o_mean, h_var, o_var) == tuple(f"{x:.4f}" for x in (h["mean"], o["mean"], h["var"], o["var"]))
    assert d_mean == f"{b['mean_diff']:.4f} [{b['mean_ci'][0]:.4f}, {b['mean_ci'][1]:.4f}]"
    assert d_var == f"{b['var_diff']:.4f} [{b['var_ci'][0]:.4f}, {b['var_ci'][1]:.4f}]"
    assert b["mean_ci"][0] < b["mean_diff"] < b["mean_ci"][1]


def test_report_opens_with_generation_alignment_and_per_user_nll_against_the_single_lms(tmp_path):
  headline = ("edit_similarity", "jaccard", "rouge_l_f1", "nll")
  report, nll = _fake_report((*headline, "hr@10"), generated_users=30)
  write_report(tmp_path, report, nll, [])
  text = (tmp_path / "report.md").read_text()
  _check_headline(report, _first_table(text), headline)
  assert text.index("| metric | vs |") < text.index("| model | nll |")  # the side-by-side table follows
  assert "30 users" in text


def test_report_of_new_users_opens_with_nll_with_and_without_the_end_marker(tmp_path):
  report, nll = _fake_report(
    ("nll", "nll_no_end", "hr@10"),
    protocol="new_users",
    ranked_users=40,
    bits_per_token={"hetlm": {"no_end": 2.0, "with_end": 2.5}},
  )
  write_report(tmp_path, report, nll, [])
  text = (tmp_path / "report.md").read_text()
  _check_headline(report, _first_table(text), ("nll", "nll_no_end"))
  assert text.index("| metric | vs |") < text.index("| model | no end marker |") < text.index("| model | nll |")


def _verdict_lines(text):
  lines = text.splitlines()
  start = lines.index("Who wins (paired bootstrap, 95% intervals):")
  end = lines.index("", start + 2)
  return lines[start + 2 : end]


def test_report_names_the_winner_of_each_comparison_as_the_bootstrap_sees_it(tmp_path):
  report, nll = _fake_report(
    ("nll", "hr@10"),
    early_stopping={"patience": 2, "max_passes_per_round": 8, "validation_users": 5},
    passes={"init_single": 6, "hetlm": 3, "single": 9},
    train_s={"hetlm": 12.4},
  )
  report["bootstrap"]["hetlm-single"]["nll"].update(mean_ci=[-0.9, -0.1], var_ci=[0.2, 0.4])
  report["bootstrap"]["hetlm-single_matched"]["nll"].update(mean_ci=[-2e-7, -1e-7], var_ci=[-0.3, -0.1])
  report["models"]["markov"]["hr@10"]["mean"] = 2.0  # higher than every LM's
  write_report(tmp_path, report, nll, [])
  text = (tmp_path / "report.md").read_text()
  verdicts = _verdict_lines(text)
  assert verdicts[0] == (
    "- `nll` (lower is better), HeTLM against `single`: HeTLM is better in the mean; `single` varies less over users."
  )
  # An interval that excludes 0 by float rounding alone (identical models) is a tie.
  assert verdicts[1] == (
    "- `nll` (lower is better), HeTLM against `single_matched`: no detectable difference in the "
    "mean; HeTLM varies less over users."
  )
  assert verdicts[2].startswith("- The best LM (`hetlm`) beats the first-order Markov chain in `nll`")
  assert verdicts[3].startswith("- The first-order Markov chain beats every LM in `hr@10` (2.0000 against")
  assert "validation NLL stopped improving" in verdicts[3]
  # How long each model trained, and the headline rows are not repeated further down.
  assert "| hetlm | 3 | – | 12 | – | – |" in text and "| single | 9 | – | – | – | – |" in text
  assert "5 validation users" in text
  assert "| hetlm-single | nll |" not in text and "| hetlm-single | hr@10 |" in text
  assert "warm-started from" not in text
  # A planted loss, and a catalogue too small for ranking metrics to discriminate, said in words.
  report["bootstrap"]["hetlm-single"]["nll"].update(mean_ci=[0.1, 0.5], var_ci=[-0.01, 0.02])
  report["n_pages"] = 17
  write_report(tmp_path, report, nll, [])
  verdicts = _verdict_lines((tmp_path / "report.md").read_text())
  assert verdicts[0] == (
    "- `nll` (lower is better), HeTLM against `single`: `single` is better in the mean; the variances over users tie."
  )
  assert any("with 17 pages" in line and "can hardly tell models apart" in line for line in verdicts)
  report["hetlm_is_init_lm"] = True  # a HeTLM that kept its init LM says so first
  write_report(tmp_path, report, nll, [])
  assert _verdict_lines((tmp_path / "report.md").read_text())[0].startswith(
    "- HeTLM *is* the single LM it was warm-started from"
  )
