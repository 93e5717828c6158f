"""train_and_evaluate end to end on a tiny synthetic log: learning, checkpoints, exact resume."""

import dataclasses
import itertools
import json

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events

from hetlm_jax.cluster import rounds
from hetlm_jax.config import ClusterConfig, Config, DataConfig, ModelConfig, TrainConfig
from hetlm_jax.pipeline import load_run, prepare_data, train_and_evaluate
from hetlm_jax.train import loop
from hetlm_jax.train.loop import Trainer


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "events.parquet"
  table, _ = markov_events(n_users=96, n_groups=2, n_pages=10, sessions=3, session_len=6)
  pq.write_table(table, path)
  return str(path)


def tiny(path, k=1, **train):
  train = {"batch_size": 16, "epochs": 2, "learning_rate": 1e-2, "log_every": 2, "checkpoint_every": 4, **train}
  return Config(
    model=ModelConfig(context=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.1),
    train=TrainConfig(**train),
    data=DataConfig(path=path),
    cluster=ClusterConfig(k=k, rounds=2, tolerance=0.0, baselines=False, init="features"),
  )


def test_training_lowers_held_out_target_nll(log_path, tmp_path):
  cfg = tiny(log_path, epochs=6)
  prepared = prepare_data(cfg)
  untrained = Trainer(cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size)), 1)
  nll_KxU, tokens_U = untrained.score(untrained.init_state().params, prepared.seqs, "target")
  report = train_and_evaluate(cfg, tmp_path)
  assert report["models"]["hetlm"]["nll"]["mean"] < 0.8 * np.mean(nll_KxU[0] / tokens_U)


def test_train_writes_checkpoints_tokenizer_config_and_metrics(log_path, tmp_path):
  train_and_evaluate(tiny(log_path), tmp_path)
  assert {"checkpoints", "tokenizer.json", "config.json", "metrics.jsonl", "assignments.parquet", "eval.json"} <= {
    p.name for p in tmp_path.iterdir()
  }
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["kind"] for r in records][0] == "start" and records[-1]["kind"] == "eval"
  train = [r for r in records if r["kind"] == "train"]
  assert train and all(
    {"loss", "perplexity", "tokens_per_s", "step_time_s", "model", "round", "pass"} <= set(r) for r in train
  )


def test_checkpoint_restores_identical_parameters(log_path, tmp_path):
  train_and_evaluate(tiny(log_path), tmp_path)
  first, second = load_run(tmp_path), load_run(tmp_path)
  assert first.step > 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(first.params), jax.device_get(second.params))
  assert first.config.model.vocab_size == first.tokenizer.vocab_size


@pytest.mark.parametrize("soft,cluster_params", [(False, "all"), (True, "all"), (False, "adapters:2")])
def test_interrupted_run_resumes_from_its_checkpoint_and_ends_exactly_as_an_uninterrupted_one(
  log_path, tmp_path, monkeypatch, soft, cluster_params
):
  """With early stopping (validation after every pass) and, for adapters, a split state."""
  cfg = tiny(log_path, k=2, log_every=1)  # two stacked models; metrics read (and the crash hook run) every step
  cfg = cfg.replace(cluster=dataclasses.replace(cfg.cluster, soft=soft, rounds=3, cluster_params=cluster_params))
  train_and_evaluate(cfg, tmp_path / "whole")

  real_step = loop.Trainer._report
  calls = {"n": 0}

  def crash_after_six_steps(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 6:
      raise KeyboardInterrupt("preempted")
    return real_step(self, *args, **kwargs)

  monkeypatch.setattr(loop.Trainer, "_report", crash_after_six_steps)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(cfg, tmp_path / "resumed")
  monkeypatch.setattr(loop.Trainer, "_report", real_step)
  saved_step = load_run(tmp_path / "resumed").step
  assert saved_step == 4  # checkpoint_every=4: the crash came at step 7

  seen_first_steps = []
  real_train_round = loop.Trainer.train_round

  def record_first_step(self, state, *args, **kwargs):
    seen_first_steps.append(int(state.step))
    return real_train_round(self, state, *args, **kwargs)

  monkeypatch.setattr(loop.Trainer, "train_round", record_first_step)
  train_and_evaluate(cfg, tmp_path / "resumed")
  assert seen_first_steps[0] == saved_step  # the interrupted round continues where it was saved
  whole, resumed = load_run(tmp_path / "whole"), load_run(tmp_path / "resumed")
  assert whole.step == resumed.step
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    jax.device_get(whole.params),
    jax.device_get(resumed.params),
  )
  np.testing.assert_array_equal(whole.assignment, resumed.assignment)
  if soft:  # responsibilities: a posterior per user, whose most likely cluster is the user's cluster
    np.testing.assert_allclose(whole.weights, resumed.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole.weights.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(whole.weights.argmax(axis=1), whole.assignment)
  else:
    assert whole.weights is None


def no_e_step_validation(monkeypatch):
  """The E-step measures validation before and after it; scripted tests script only the rounds' validations."""
  real = rounds.e_step
  monkeypatch.setattr(rounds, "e_step", lambda *args, **kwargs: real(*args, **{**kwargs, "validate": None}))


def test_a_round_stops_after_patience_validations_without_progress_and_keeps_its_best_pass(
  log_path, tmp_path, monkeypatch
):
  cfg = tiny(log_path, epochs=8, patience=2, val_every=0.5)
  # Round start, then after each pass: passes 1-2 are worse than the start, but a round from scratch trains at
  # least half its cap (4 passes); the best is pass 3, and patience stops the round 2 passes later. The kept pass
  # is near the peak of the schedule, so an anneal round follows, validated every half pass: it never beats its
  # start (pass 3), and patience (2 validations) stops it after one pass.
  script = itertools.chain([5.0, 6.0, 5.5, 3.0, 3.5, 3.2, 3.0, 3.3, 3.4], itertools.repeat(9.0))
  seen = []

  def scripted(self, trainer, params, assignment, weights):
    seen.append(jax.device_get(params))
    return next(script), 0.0

  monkeypatch.setattr(rounds.Validation, "stats", scripted)
  report = train_and_evaluate(cfg, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  cold, anneal = [r for r in records if r["kind"] == "stop"]
  assert (cold["passes"], cold["best_pass"], cold["validation_nll"]) == (5, 3, 3.0)
  assert (anneal["round_kind"], anneal["passes"], anneal["improved"]) == ("anneal", 1.0, False)
  assert [r["pass"] for r in records if r["kind"] == "validation"] == [1, 2, 3, 4, 5, 0.5, 1.0]
  assert report["passes"] == {"hetlm": 6.0}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_run(tmp_path).params), seen[3])


def test_hetlm_rounds_end_when_a_round_cannot_improve_on_its_start_then_anneal(log_path, tmp_path, monkeypatch):
  cfg = tiny(log_path, k=2, epochs=4, patience=2, val_every=1.0)
  cfg = cfg.replace(cluster=dataclasses.replace(cfg.cluster, rounds=3))
  # Round 1 improves at pass 1; round 2 never beats its start; then the anneal (from pass 1 of round 1, near
  # the peak rate) improves at its first pass.
  script = itertools.chain([5.0, 4.0, 4.5, 4.6, 4.0, 4.1, 4.2, 4.0, 3.9, 3.95], itertools.repeat(9.0))
  monkeypatch.setattr(rounds.Validation, "stats", lambda *args: (next(script), 0.0))
  no_e_step_validation(monkeypatch)
  report = train_and_evaluate(cfg, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["round"], r["round_kind"], r["passes"], r["best_pass"]) for r in records if r["kind"] == "stop"] == [
    (1, "cold", 3, 1),
    (2, "cold", 2, 0),
    (3, "anneal", 2, 1),
  ]
  assert [r["round"] for r in records if r["kind"] == "round"] == [1]  # no E-step after round 2, nor the anneal
  assert report["rounds"] == 3 and report["passes"] == {"hetlm": 7}
  assert report["hetlm_is_init_lm"] is False  # its first round improved (and it was not warm-started)


def test_validation_users_train_but_are_left_out_of_the_evaluation(log_path, tmp_path):
  cfg = tiny(log_path, val_frac=0.25)
  report = train_and_evaluate(cfg, tmp_path)
  users = prepare_data(cfg).seqs.num_users
  assert report["early_stopping"]["validation_users"] + report["n_users"] == users
  assert 0.1 * users < report["early_stopping"]["validation_users"] < 0.4 * users
  assert len(load_run(tmp_path).assignment) == users
