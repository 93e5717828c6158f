"""The evaluation harness: eval.json and report.md for every model, routing from the history alone."""

import json

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from hetlm_jax import pipeline
from hetlm_jax.config import ClusterConfig, Config, DataConfig, ModelConfig, TrainConfig
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.eval.evaluate import LMFamily, first_page_index, route_by_history
from hetlm_jax.main import cli
from hetlm_jax.model import PageLM
from hetlm_jax.pipeline import (
  cluster_shares,
  generate_for_user,
  load_run,
  prepare_data,
  train_and_evaluate,
  validation_slice,
)
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.split import model_params

OTTO = "tests/data/otto_sample.parquet"
MODELS = ("single", "single_matched", "hetlm", "markov", "markov_mixture", "popularity")


@pytest.fixture(scope="module")
def otto_run(tmp_path_factory):
  """Train and evaluate on the 20 real OTTO shoppers (clicks, carts, orders): outcomes end to end."""
  workdir = tmp_path_factory.mktemp("otto")
  cfg = Config(
    model=ModelConfig(context=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
    train=TrainConfig(batch_size=8, epochs=2, eval_batch_size=16),
    data=DataConfig(path=OTTO),
    cluster=ClusterConfig(k=2, rounds=2, init="random"),
  )
  report = train_and_evaluate(cfg, workdir)
  return workdir, report


def test_eval_json_holds_every_model_and_metric_as_specified(otto_run):
  workdir, report = otto_run
  on_disk = json.loads((workdir / "eval.json").read_text())
  assert on_disk["n_users"] == report["n_users"] > 0
  for model in MODELS:
    for metric in ("nll", "perplexity", "hr@10", "ndcg@10", "mrr"):
      assert set(on_disk["models"][model][metric]) == {"mean", "var", "std", "p10", "p50", "p90"}, (model, metric)
  assert np.isfinite(on_disk["models"]["hetlm"]["nll"]["mean"])
  assert "hetlm-single" in on_disk["bootstrap"] and "hetlm_mixture" in on_disk["models"]


def test_hetlm_mixture_weights_the_models_by_their_posterior_given_the_history(otto_run):
  workdir, report = otto_run
  run = load_run(workdir)
  prepared = prepare_data(run.config, run.tokenizer)
  seqs, _, evaluated_U = validation_slice(run.config, prepared)  # the validation users are not reported
  trainer = Trainer(run.config, 2)
  target_KxU, tokens_U = trainer.score(run.params, seqs, "target")
  history_KxU, _ = trainer.score(run.params, seqs, "history")
  log_prior_K = np.log(cluster_shares(run.assignment, run.weights, 2))
  log_post_KxU = log_prior_K[:, None] - history_KxU
  log_post_KxU -= logsumexp(log_post_KxU, axis=0)
  expected_U = -logsumexp(log_post_KxU - target_KxU, axis=0) / tokens_U
  by_prior_U = -logsumexp(log_prior_K[:, None] - target_KxU, axis=0) / tokens_U
  assert by_prior_U.mean() != pytest.approx(expected_U.mean(), rel=1e-3)  # the prior's answer differs
  assert report["models"]["hetlm_mixture"]["nll"]["mean"] == pytest.approx(expected_U[evaluated_U].mean(), rel=1e-5)


def test_report_opens_with_generation_alignment_and_nll_with_bootstrap_intervals(otto_run):
  workdir, report = otto_run
  headline = ("edit_similarity", "jaccard", "rouge_l_f1", "nll")
  for other in ("single", "single_matched"):
    for metric in headline:
      b = report["bootstrap"][f"hetlm-{other}"][metric]
      assert np.isfinite([b["mean_diff"], *b["mean_ci"], b["var_diff"], *b["var_ci"]]).all(), (other, metric)
  lines = (workdir / "report.md").read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  rows = [line.split("|")[1:3] for line in lines[start + 2 :] if line.startswith("|")][:8]
  assert [(m.strip(), o.strip()) for m, o in rows] == [(m, o) for m in headline for o in ("single", "single_matched")]
  assert lines[start].count("95% CI") == 2


def test_outcome_metrics_run_end_to_end_on_real_shoppers(otto_run):
  outcomes = otto_run[1]["outcomes"]
  assert set(outcomes["hetlm"]) == {"carts", "orders"}
  assert all(o["users"] > 0 for o in outcomes["hetlm"].values())


def test_report_and_figures_are_written(otto_run):
  workdir, _ = otto_run
  report = (workdir / "report.md").read_text()
  assert "| hetlm |" in report and "| single_matched |" in report and "paired bootstrap" in report
  assert (workdir / "nll_per_user.png").stat().st_size > 0 and (workdir / "rounds.png").stat().st_size > 0


def test_evaluate_and_generate_commands_use_the_saved_run(otto_run, capsys, monkeypatch):
  workdir, report = otto_run
  assert cli(["hetlm", "evaluate", f"--workdir={workdir}"]) == 0
  again = json.loads((workdir / "eval.json").read_text())
  assert again["models"]["hetlm"]["nll"]["mean"] == pytest.approx(report["models"]["hetlm"]["nll"]["mean"])
  capsys.readouterr()
  loaded = []  # generate loads the one model family it uses
  monkeypatch.setattr(
    pipeline, "load_run", lambda w, name, *a, **kw: loaded.append(name) or load_run(w, name, *a, **kw)
  )
  out = generate_for_user(workdir, "0")
  assert loaded == ["hetlm"]
  assert out["history"][0] == "<s>" and out["cluster"] in (0, 1) and isinstance(out["generated"], list)
  assert not {"<s>", "</s>", "<pad>"} & {*out["generated"], *out["actual"]} and out["actual"]  # pages alike
  assert cli(["hetlm", "generate", f"--workdir={workdir}", "--user=0"]) == 0
  printed = capsys.readouterr().out
  assert "history:" in printed and "generated:" in printed and "actual:" in printed
  assert cli(["hetlm", "generate", f"--workdir={workdir}", "--user=no-such-user"]) == 2


def test_routing_uses_only_the_history(otto_run):
  workdir, _ = otto_run
  run = load_run(workdir)
  family = LMFamily("hetlm", Trainer(run.config, 2), run.params, run.assignment)
  seqs = prepare_data(run.config, run.tokenizer).seqs
  scrambled_tokens = seqs.tokens.copy()
  user_N = np.repeat(np.arange(seqs.num_users), seqs.offsets[1:] - seqs.split)
  target_N = np.concatenate([np.arange(a, b) for a, b in zip(seqs.split, seqs.offsets[1:])])
  scrambled_tokens[target_N] = np.random.default_rng(0).integers(4, run.tokenizer.vocab_size, len(target_N))
  scrambled = UserSequences(seqs.user_ids, scrambled_tokens, seqs.offsets, seqs.split, seqs.n_sessions)
  np.testing.assert_array_equal(route_by_history(family, seqs), route_by_history(family, scrambled))
  assert len(user_N) == len(target_N)


def test_lm_next_page_distribution_matches_a_direct_forward_pass(otto_run):
  workdir, _ = otto_run
  run = load_run(workdir, "single")
  seqs = prepare_data(run.config, run.tokenizer).seqs
  trainer = Trainer(run.config, 1)
  users = np.arange(3)
  logp = trainer.next_logprobs(run.params, seqs, users, np.zeros(3, np.int64))
  params = model_params(run.params, 0)
  for u in users:
    context = seqs.tokens[seqs.offsets[u] : first_page_index(seqs)[u]][-run.config.model.context :]
    logits = PageLM(run.config.model).apply({"params": params}, context[None])[0, -1]
    np.testing.assert_allclose(logp[u], jax.nn.log_softmax(logits), rtol=1e-5, atol=1e-5)


def test_one_clusters_batch_runs_only_its_model_and_matches_every_model(otto_run):
  run = load_run(otto_run[0])
  seqs = prepare_data(run.config, run.tokenizer).seqs
  trainer = Trainer(run.config, 2)
  users = np.arange(4)
  every_KxBxV = trainer.next_logprobs(run.params, seqs, users)
  assert every_KxBxV.shape[:2] == (2, 4)
  for k in (0, 1):
    np.testing.assert_allclose(
      trainer.next_logprobs(run.params, seqs, users, np.full(4, k)), every_KxBxV[k], rtol=1e-5, atol=1e-5
    )
  mixed = trainer.next_logprobs(run.params, seqs, users, np.array([0, 1, 1, 0]))
  np.testing.assert_allclose(mixed, every_KxBxV[[0, 1, 1, 0], np.arange(4)], rtol=1e-5, atol=1e-5)


def test_a_users_next_page_distribution_does_not_depend_on_how_wide_the_batchs_prompts_are(tmp_path):
  """next_logprobs cuts prompts to the batch's longest (rounded up to a power of two): a short history gives
  the same distribution in a batch of short ones (width 8) as beside a long one (the whole context)."""
  cfg = Config(
    model=ModelConfig(context=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=12),
    train=TrainConfig(batch_size=4, eval_batch_size=4),
  )
  tokens, offsets, split = [], [0], []
  for length in (3, 5, 40):  # histories of 3, 5 and 40 tokens (the last longer than the context), then 2 targets
    tokens += [int(x) for x in 3 + np.arange(length + 2) % 9]
    split.append(offsets[-1] + length)
    offsets.append(len(tokens))
  seqs = UserSequences(
    np.array(["a", "b", "c"]), np.array(tokens, np.int32), np.array(offsets), np.array(split), np.ones(3, np.int32)
  )
  trainer = Trainer(cfg, 1)
  params = trainer.init_state().params
  short = trainer.next_logprobs(params, seqs, np.array([0, 1]), np.array([0, 0]))
  beside_long = trainer.next_logprobs(params, seqs, np.array([0, 1, 2]), np.array([0, 0, 0]))
  np.testing.assert_allclose(short, beside_long[:2], rtol=1e-5, atol=1e-6)
