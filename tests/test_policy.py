"""The round policy (cluster/policy.py): schedules, the pull toward the init LM, routing by held-out tails,
the cap on repeats, and an E-step that runs even when the first round fails."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events

from hetlm_jax import pipeline
from hetlm_jax.cluster import rounds, toward_init
from hetlm_jax.cluster.policy import Policy
from hetlm_jax.config import ClusterConfig, Config, DataConfig, ModelConfig, TrainConfig
from hetlm_jax.data.sequences import UserSequences, build_sequences, routing_split
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.train.batches import ClusterBatches, ScoringBatches
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.train.split import model_params
from hetlm_jax.train.state import _SCHEDULE_RESOLUTION, cold_lr, decay_lr, schedule_lr


def test_a_cold_round_follows_optaxs_warmup_cosine_schedule_as_before():
  t = TrainConfig(learning_rate=3e-3, warmup_frac=0.05)
  reference = optax.warmup_cosine_decay_schedule(
    init_value=3e-5, peak_value=3e-3, warmup_steps=500, decay_steps=_SCHEDULE_RESOLUTION, end_value=1.5e-4
  )
  for fraction in (0.0, 0.01, 0.05, 0.3, 0.77, 1.0):
    np.testing.assert_allclose(
      schedule_lr(t.warmup_frac, fraction, cold_lr(t)), reference(int(fraction * _SCHEDULE_RESOLUTION)), rtol=1e-5
    )


def test_a_round_from_a_trained_model_starts_at_its_rate_with_no_warmup_and_decays_to_a_twentieth():
  rates = [float(schedule_lr(0.05, f, decay_lr(1e-4))) for f in np.linspace(0, 1, 21)]
  np.testing.assert_allclose(rates[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(rates[-1], 5e-6, rtol=1e-5)
  assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_prox_pulls_every_model_toward_the_anchor_by_prox_times_the_distance():
  """With an identity optimizer and lr 1, the step with prox moves each parameter by prox (theta - anchor)
  more than the step without: the gradient of prox/2 ||theta - anchor||^2, on own and shared parts alike."""
  from hetlm_jax.model import PageLM
  from hetlm_jax.train.split import partition
  from hetlm_jax.train.state import init_state
  from hetlm_jax.train.step import stacked_step

  cfg = Config(
    model=ModelConfig(
      vocab_size=19, context=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, output_bias=True
    ),
    cluster=ClusterConfig(cluster_params="top:1"),
  )
  k, prox, tx = 2, 0.3, optax.identity()
  state = init_state(cfg, tx, jax.random.key(0), k)
  anchor = jax.tree.map(
    lambda x: x + 0.5,
    partition(
      "top:1", 2, jax.device_get(jax.tree.map(lambda x: x[0], {**state.params["shared"], **state.params["cluster"]}))
    ),
  )
  rng = np.random.default_rng(0)
  inputs = rng.integers(4, 19, (k, 4, 9)).astype(np.int32)
  segments = np.ones((k, 4, 9), np.int32)
  step = lambda p, **kw: jax.jit(
    lambda anchor: stacked_step(
      PageLM(cfg.model),
      tx,
      "top:1",
      2,
      False,
      1.0,
      state.params,
      state.opt_state,
      inputs,
      segments,
      (segments > 0).astype(np.float32),
      jax.random.split(jax.random.key(1), k),
      prox=p,
      anchor=anchor,
    )[0]
  )(**kw)
  plain, pulled = step(0.0, anchor=None), step(prox, anchor=anchor)
  for part in ("shared", "cluster"):
    expected = jax.tree.map(lambda p, a: -prox * (p - a), state.params[part], anchor[part])
    jax.tree.map(
      lambda a, b, e: np.testing.assert_allclose(a - b, e, rtol=1e-4, atol=1e-6), pulled[part], plain[part], expected
    )


def _seqs_with_a_planted_last_page(planted=7):
  """Three users whose histories end with page `planted`, which appears nowhere else."""
  tokens, offsets, split = [], [0], []
  for u, n in enumerate((5, 9, 14)):
    history = [1] + [4 + (u + i) % 3 for i in range(n - 2)] + [planted]
    target = [4, 5]
    split.append(offsets[-1] + len(history))
    tokens += history + target
    offsets.append(len(tokens))
  return UserSequences(
    np.array(["a", "b", "c"], object),
    np.array(tokens, np.int32),
    np.array(offsets),
    np.array(split),
    np.ones(3, np.int32),
  )


def test_routing_never_scores_a_token_the_m_step_trained_on():
  seqs, planted = _seqs_with_a_planted_last_page(), 7
  routed = routing_split(seqs, 0.2)
  batches = ClusterBatches(routed, np.array([0, 1, 0]), 2, batch_size=2, context=8, epochs=3, seed=0, round_index=0)
  for s in range(batches.steps):
    tokens, segments, _ = batches.batch(s)
    assert not (tokens[segments > 0] == planted).any()  # neither a target nor an input of any training step
  scoring = ScoringBatches(routed, "target", 9, 4)
  scored = []
  for i in range(scoring.num_batches):
    tokens, _, mask, owner = scoring.batch(i)
    scored += list(zip(owner[:, 1:][mask], tokens[:, 1:][mask]))
  assert sorted(u for u, t in scored if t == planted) == [0, 1, 2]  # every user is routed by their tail
  np.testing.assert_array_equal(routed.target_lengths, np.ceil(0.2 * seqs.history_lengths))
  assert routed.num_tokens == int(seqs.history_lengths.sum())  # held-out targets are not in it at all


def test_a_small_cluster_repeats_its_users_at_most_max_repeat_times_a_pass():
  table, _ = markov_events(n_users=60, n_groups=2, n_pages=8, sessions=2, session_len=5)
  seqs, _ = build_sequences(table, PageTokenizer.fit(table["page"], []))
  assignment = (np.arange(seqs.num_users) < 4).astype(np.int32)  # cluster 1: 4 users, cluster 0: the rest
  for cap, expected in ((0, None), (2, 2)):
    batches = ClusterBatches(seqs, assignment, 2, 8, 16, 1, 0, 0, max_repeat=cap)
    epoch = [batches.batch(s) for s in range(batches.steps_per_epoch)]
    tokens, segments, weights = (np.concatenate(parts, axis=1) for parts in zip(*epoch, strict=True))
    copies = len(np.unique(segments[1][segments[1] > 0]))
    examples = int((assignment == 1).sum())
    if expected is None:
      assert copies > 2 * examples  # uncapped, the small cluster cycles many times to fill its rows
    else:
      assert copies == expected * examples
    # Each user still counts once per pass: their tokens' weights sum to their trained tokens.
    np.testing.assert_allclose(weights[1].sum(), batches.tokens_K[1], rtol=1e-5)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "events.parquet"
  pq.write_table(markov_events(n_users=96, n_groups=2, n_pages=10, sessions=3, session_len=6)[0], path)
  return str(path)


def _tiny(path, **cluster):
  return Config(
    model=ModelConfig(context=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
    train=TrainConfig(
      batch_size=16, epochs=2, warm_epochs=1, val_every=0.5, learning_rate=1e-2, log_every=2, checkpoint_every=4
    ),
    data=DataConfig(path=path),
    cluster=ClusterConfig(**{"k": 2, "rounds": 3, "tolerance": 0.0, "init_rounds": 1, **cluster}),
  )


def test_an_e_step_runs_even_when_the_first_round_fails(log_path, tmp_path, monkeypatch):
  cfg = _tiny(log_path)
  prepared = pipeline.prepare_data(cfg)
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size))
  seqs, validation, _ = pipeline.validation_slice(cfg, prepared)
  start = rounds.Trainer(cfg, 1).init_state().params
  monkeypatch.setattr(rounds.Validation, "stats", lambda *args: (1.0, 0.5))  # nothing ever beats the start
  log = MetricsLog(tmp_path / "metrics.jsonl")
  trained = rounds.train_family(
    "hetlm",
    cfg,
    2,
    seqs,
    tmp_path,
    log,
    lambda: np.arange(seqs.num_users) % 2,
    3,
    validation,
    warm_params=lambda: start,
  )
  stops, estep = log.records("stop"), log.records("round")
  assert [(r["round"], r["round_kind"], r["improved"]) for r in stops] == [(1, "warm", False), (2, "warm", False)]
  assert [r["round"] for r in estep] == [1] and estep[0]["moved"] > 0  # the trained models moved users
  assert estep[0]["validation_before"] == 1.0 and estep[0]["validation_after"] == 1.0
  assert trained.rounds == 2  # the second round, on the new assignment, failed too: the rounds end
  assert not np.array_equal(trained.assignment, np.arange(seqs.num_users) % 2)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(model_params(trained.params, 1)),
    jax.device_get(model_params(start, 0)),
  )  # and the models went back to where they started


def test_a_family_from_scratch_anneals_from_its_kept_pass_unless_it_was_already_annealed():
  cfg = Config(train=TrainConfig(learning_rate=1e-2, epochs=4, warm_epochs=2))
  policy = Policy(cfg, 1, warm=False, validating=True)
  at = policy.first_position()
  cold = policy.plan(at)
  assert cold.kind == "cold" and cold.min_checks == 2
  for kept, anneals in ((1, True), (4, False)):
    at = dataclasses.replace(policy.first_position(), round=1, kept_lr=policy.kept_lr(cold, kept, 10))
    policy.end_round(cold, at, improved=True, rounds=1, moved=None)
    assert at.cold_done and at.done is not anneals
    if anneals:
      anneal = policy.plan(at)
      assert anneal.kind == "anneal" and anneal.passes == 2 and anneal.min_checks == 0
      np.testing.assert_allclose(anneal.round_lr[0], at.kept_lr, rtol=1e-6)
  warm = Policy(cfg, 4, warm=True, validating=True).plan(policy.first_position())
  np.testing.assert_allclose(warm.round_lr[:2], cfg.cluster.warm_lr_scale * 1e-2, rtol=1e-6)
  assert warm.kind == "warm" and warm.min_checks == 0 and warm.val_every == cfg.train.val_every


def test_interpolation_at_zero_is_the_init_lm_and_at_one_the_cluster_model():
  from hetlm_jax.train.split import partition
  from hetlm_jax.train.state import init_state

  cfg = Config(
    model=ModelConfig(vocab_size=19, context=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, output_bias=True),
    cluster=ClusterConfig(cluster_params="top:1"),
  )
  params = jax.device_get(init_state(cfg, optax.identity(), jax.random.key(0), 3).params)
  anchor = model_params(jax.device_get(init_state(cfg, optax.identity(), jax.random.key(1), 1).params), 0)
  at = lambda alpha_K, shared: jax.device_get(
    toward_init.interpolate_params(params, anchor, np.array(alpha_K), shared, "top:1", 2)
  )
  same = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  for k in range(3):
    same(model_params(at([0.0, 0.0, 0.0], 0.0), k), anchor)
    same(model_params(at([1.0, 1.0, 1.0], 1.0), k), model_params(params, k))
  half = at([0.0, 1.0, 0.5], 1.0)  # each cluster its own alpha
  same(model_params(half, 1), model_params(params, 1))
  same(partition("top:1", 2, model_params(half, 0))["cluster"], partition("top:1", 2, anchor)["cluster"])


def test_interpolated_hetlm_is_no_worse_than_its_init_lm_on_the_validation_users(log_path, tmp_path):
  cfg = _tiny(log_path, init="embedding", warm_start=True, interpolate=True, baselines=True, rounds=1)
  report = pipeline.train_and_evaluate(cfg, tmp_path)
  (mixed,) = [r for r in MetricsLog(tmp_path / "metrics.jsonl").records("interpolate") if r["model"] == "hetlm"]
  assert len(mixed["alpha"]) == 2 and set(mixed["alpha"]) <= set(toward_init.INTERPOLATION_GRID)
  assert mixed["validation_nll"] <= mixed["validation_init"] + 1e-9
  assert report["validation"]["hetlm"]["mean"] <= report["validation"]["single"]["mean"] + 1e-6
  np.testing.assert_allclose(report["validation"]["hetlm"]["mean"], mixed["validation_nll"], rtol=1e-5)
  # single_ft, the K=1 control, is fine-tuned and interpolated exactly as HeTLM is; every model says how it trained
  assert {"hetlm", "single", "single_ft", "single_matched"} <= set(report["models"])
  assert set(report["passes"]) >= {"hetlm", "single_ft", "init_single"} and report["tokens_trained"]["hetlm"] > 0
  assert "| single_ft |" in (tmp_path / "report.md").read_text()


def _mix_family(lam_K):
  """A K=2 family of random models, its Trainer mixing them with a third random model by `lam_K` (None: not)."""
  from hetlm_jax.train.loop import Trainer

  cfg = Config(
    model=ModelConfig(vocab_size=19, context=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
    train=TrainConfig(eval_batch_size=16),
  )
  trainer = Trainer(cfg, 2)
  params = trainer.init_state().params
  anchor = trainer.anchor_from(
    Trainer(cfg.replace(train=dataclasses.replace(cfg.train, seed=1)), 1).init_state().params
  )
  if lam_K is not None:
    trainer.set_mix(anchor, lam_K)
  return cfg, trainer, params, anchor


def _mix_data():
  table, _ = markov_events(n_users=12, n_groups=2, n_pages=15, sessions=2, session_len=4)
  return build_sequences(table, PageTokenizer.fit(table["page"], []))[0]


def test_mixing_with_the_init_lm_in_prediction_space_scores_and_ranks_the_mixture():
  """--mix_init: lam 1 is the cluster model, lam 0 the init LM (anchor), each exactly; next-page distributions
  are lam p_k + (1 - lam) p_init; a token's mixed NLL lies between the two and below their lam-weighted mean."""
  seqs = _mix_data()
  users = np.arange(seqs.num_users)
  _, trainer, params, anchor = _mix_family(None)
  own_KxU, tokens_U = trainer.score(params, seqs, "target")
  own_KxUxV = trainer.next_logprobs(params, seqs, users)
  anchor_family = {"shared": {}, "cluster": jax.tree.map(lambda x: np.stack([x, x]), jax.device_get(anchor))}
  init_KxU, _ = trainer.score(anchor_family, seqs, "target")
  init_UxV = trainer.next_logprobs(anchor_family, seqs, users)[0]
  assert not np.allclose(own_KxU, init_KxU)
  for lam in ([1.0, 1.0], [0.0, 0.0], [0.3, 0.8]):
    trainer.set_mix(anchor, lam)
    mixed_KxU, mixed_tokens_U = trainer.score(params, seqs, "target")
    np.testing.assert_array_equal(mixed_tokens_U, tokens_U)
    lam_K1 = np.array(lam)[:, None]
    if lam[0] in (0.0, 1.0):
      np.testing.assert_allclose(mixed_KxU, own_KxU if lam[0] else init_KxU, rtol=1e-6)
    else:  # -log(lam p + (1 - lam) q) is below lam (-log p) + (1 - lam) (-log q) (Jensen), -log(lam p) and
      # -log((1 - lam) q), token by token, so summed over a user's tokens too
      assert (mixed_KxU < lam_K1 * own_KxU + (1 - lam_K1) * init_KxU[0]).all()
      assert (mixed_KxU < own_KxU - tokens_U * np.log(lam_K1)).all()
      assert (mixed_KxU < init_KxU[0] - tokens_U * np.log1p(-lam_K1)).all()
    with np.errstate(divide="ignore"):
      expected_KxUxV = np.logaddexp(np.log(lam_K1[..., None]) + own_KxUxV, np.log1p(-lam_K1[..., None]) + init_UxV)
    np.testing.assert_allclose(trainer.next_logprobs(params, seqs, users), expected_KxUxV, rtol=1e-5, atol=1e-6)
    ones = np.ones(seqs.num_users, np.int32)  # one cluster's batch runs that model alone, mixed the same
    np.testing.assert_allclose(
      trainer.next_logprobs(params, seqs, users, ones), expected_KxUxV[1], rtol=1e-5, atol=1e-6
    )
  trainer.set_mix(None, None)
  np.testing.assert_allclose(trainer.score(params, seqs, "target")[0], own_KxU, rtol=1e-6)


def test_a_mixed_tokens_nll_is_that_of_the_mixed_probability():
  from hetlm_jax.train.step import mix_nll

  nll, anchor_nll = np.array([0.1, 2.0, 5.0]), np.array([3.0, 0.5, 5.0])
  for lam in (0.0, 0.25, 1.0):
    with np.errstate(divide="ignore"):
      expected = -np.log(lam * np.exp(-nll) + (1 - lam) * np.exp(-anchor_nll))
    np.testing.assert_allclose(mix_nll(nll, anchor_nll, lam), expected, rtol=1e-6)


def test_fitted_weights_are_the_validation_minimum_and_a_tie_goes_to_the_init_lm():
  """_fit_weights (--interpolate, --mix_init): the common weight minimises the validation mean, each cluster's
  its own users' mean; weights whose scores differ only by float noise resolve to the smaller one."""
  users = np.arange(6)
  validation = rounds.Validation(seqs=None, users=users)
  assignment_U = np.array([0, 0, 0, 1, 1, 1])
  # cluster 0's users are best at w = 0.75, cluster 1's are the same at every w but for noise
  per_user = lambda w_K, _: np.where(assignment_U == 0, (w_K[0] - 0.75) ** 2, 1.0 + 1e-10 * w_K[1])
  w_K, common, scores, final = toward_init.fit_weights(2, validation, assignment_U, per_user, rescore_own=False)
  assert common == 0.75 and list(w_K) == [0.75, 0.0]
  np.testing.assert_allclose(final, per_user(w_K, common))


def test_generation_from_a_mixture_at_lam_one_is_the_cluster_models_and_at_zero_the_init_lms():
  from hetlm_jax.eval.generate import Sampling, generate

  seqs = _mix_data()
  cfg, trainer, params, anchor = _mix_family(None)
  assignment_U = np.arange(seqs.num_users, dtype=np.int32) % 2
  users, s = np.arange(seqs.num_users), Sampling(max_new=5)
  run = lambda p, mix=None: generate(cfg.model, p, seqs, assignment_U, users, s, batch=8, mix=mix)
  anchor_family = {"shared": {}, "cluster": jax.tree.map(lambda x: np.stack([x, x]), jax.device_get(anchor))}
  own, init = run(params), run(anchor_family)
  assert any(not np.array_equal(a, b) for a, b in zip(own, init))
  for lam, expected in ((1.0, own), (0.0, init)):
    trainer.set_mix(anchor, [lam, lam])
    for got, want in zip(run(params, trainer.mix), expected):
      np.testing.assert_array_equal(got, want)


def test_a_hetlm_mixed_with_its_init_lm_is_fitted_on_validation_saved_with_it_and_counted(log_path, tmp_path):
  """--mix_init end to end: lam from the grid by the validation users (no worse than the init LM there), the init
  LM's parameters in HeTLM's total, and the saved family (with its anchor) scores as the trained one did."""
  from hetlm_jax.predict import Predictor

  cfg = _tiny(log_path, init="embedding", warm_start=True, mix_init=True, interpolate=False, baselines=True, rounds=1)
  report = pipeline.train_and_evaluate(cfg, tmp_path)
  records = MetricsLog(tmp_path / "metrics.jsonl").records("mix")
  (mixed,) = [r for r in records if r["model"] == "hetlm"]
  assert {r["model"] for r in records} == {"hetlm", "single_ft"}  # the K=1 control mixes exactly as HeTLM does
  assert len(mixed["lam"]) == 2 and set(mixed["lam"]) <= set(toward_init.INTERPOLATION_GRID)
  assert mixed["validation_nll"] <= mixed["validation_init"] + 1e-9
  np.testing.assert_allclose(report["validation"]["hetlm"]["mean"], mixed["validation_nll"], rtol=1e-5)
  one = report["params"]["single"]  # the init LM's size
  assert report["params"]["hetlm"] == 3 * one and report["hetlm_params"]["init_lm"] == one
  assert report["params"]["single_ft"] == 2 * one
  loaded = pipeline.load_run(tmp_path)
  np.testing.assert_allclose(jax.device_get(loaded.trainer.mix[1]), mixed["lam"])
  again = pipeline.evaluate_workdir(tmp_path)
  np.testing.assert_allclose(
    again["models"]["hetlm"]["nll"]["mean"], report["models"]["hetlm"]["nll"]["mean"], rtol=1e-6
  )
  predictor = Predictor.load(tmp_path)
  assert predictor.trainer.mix is not None
  assert len(predictor.next_pages([["/p/1", "/p/2", "/p/3"]], k=3).pages[0]) == 3


@pytest.mark.slow  # three runs of a warm-started HeTLM with its baselines: about 2 minutes on 2 cores
def test_a_run_with_every_new_policy_flag_resumes_mid_round_exactly(log_path, tmp_path, monkeypatch):
  """--prox, --route_frac, --max_repeat, --interpolate and --mix_init on a warm-started HeTLM: interrupted, then
  resumed, it ends where an uninterrupted run does."""
  from hetlm_jax.train import loop

  cfg = _tiny(
    log_path, init="embedding", warm_start=True, prox=1.0, route_frac=0.25, interpolate=True, mix_init=True, rounds=2
  )
  cfg = cfg.replace(train=dataclasses.replace(cfg.train, max_repeat=2, log_every=1, checkpoint_every=3))
  pipeline.train_and_evaluate(cfg, tmp_path / "whole")
  real_report, calls = loop.Trainer._report, {"n": 0}

  def crash(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 20:  # in HeTLM's first warm round (the init LM trains 2 passes of 4 steps, then anneals)
      raise KeyboardInterrupt("preempted")
    return real_report(self, *args, **kwargs)

  monkeypatch.setattr(loop.Trainer, "_report", crash)
  with pytest.raises(KeyboardInterrupt):
    pipeline.train_and_evaluate(cfg, tmp_path / "resumed")
  monkeypatch.setattr(loop.Trainer, "_report", real_report)
  assert (tmp_path / "resumed" / "checkpoints" / "hetlm").exists()  # it stopped inside HeTLM's training
  pipeline.train_and_evaluate(cfg, tmp_path / "resumed")
  whole, resumed = pipeline.load_run(tmp_path / "whole"), pipeline.load_run(tmp_path / "resumed")
  assert whole.step == resumed.step
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    jax.device_get(whole.params),
    jax.device_get(resumed.params),
  )
  np.testing.assert_array_equal(whole.assignment, resumed.assignment)
  np.testing.assert_array_equal(jax.device_get(whole.trainer.mix[1]), jax.device_get(resumed.trainer.mix[1]))


@pytest.mark.slow  # 3 HeTLMs and 4 single_matched LMs: about 2.5 minutes on 2 cores
def test_tuning_chooses_both_sides_on_the_validation_users_alone(log_path, tmp_path):
  """HeTLM's prox and single_matched's learning rate and dropout come from their grids, each the lowest
  per-user mean NLL of the validation users (tuning.choose reads nothing else)."""
  from hetlm_jax.cluster import tuning

  cfg = _tiny(
    log_path, init="embedding", warm_start=True, tune_baselines=True, baselines=True, rounds=1, interpolate=False
  )
  report = pipeline.train_and_evaluate(cfg, tmp_path)
  tuned = json.loads((tmp_path / "tuned.json").read_text())
  for name, grid in (("hetlm", tuning.prox_candidates(cfg)), ("single_matched", None)):
    scores = report["tuning"][name]["validation_nll"]
    assert tuned[name] == report["tuning"][name]["chosen"] == min(scores, key=scores.get)
    if grid is not None:
      assert set(scores) == set(grid)
  assert len(report["tuning"]["single_matched"]["validation_nll"]) == 4
  # The chosen families are what load_run and `hetlm evaluate` call hetlm and single_matched.
  assert pipeline.load_run(tmp_path, "hetlm").step == pipeline.load_run(tmp_path, tuned["hetlm"]).step
  again = pipeline.evaluate_workdir(tmp_path)
  assert again["tuning"] == report["tuning"] and set(again["models"]) == set(report["models"])


def test_clusters_fitted_back_to_the_init_lm_are_named_and_grouped_as_one_model():
  from hetlm_jax.cluster.policy import Position
  from hetlm_jax.eval.report import _verdict

  at = Position(round=2, warm=True, improved=True, alpha=[0.0, 1.0, 0.0, 0.75], alpha_shared=0.5)
  assert at.same_model_groups(4) == [[0, 2]]  # one cluster part (the init LM's) and one shared part
  assert at.clusters_as_init(4, has_shared=True) == []  # the shared part moved: not the init LM itself
  assert at.clusters_as_init(4, has_shared=False) == [0, 2]
  assert Position(round=2, warm=True, improved=True, alpha=[0.0, 1.0, 0.0, 0.75], alpha_shared=0.0).clusters_as_init(
    4, has_shared=True
  ) == [0, 2]
  assert Position(round=2, warm=True, improved=True, mix=[0.0, 0.5, 0.0]).same_model_groups(3) == [[0, 2]]
  kept = Position(round=2, warm=True, improved=False)
  assert kept.same_model_groups(3) == [[0, 1, 2]] and kept.clusters_as_init(3, True) == [0, 1, 2]
  assert Position(round=2).same_model_groups(3) == [] and Position(round=2).clusters_as_init(3, True) == []
  report = {"models": {"hetlm": {"nll": {"mean": 1.5}}}, "k": 4, "hetlm_clusters_as_init": [0, 2]}
  [line] = _verdict(report)
  assert line.endswith(
    "2 of HeTLM's K=4 clusters differ from its init LM; clusters 0, 2 are that LM "
    "(fitted back to it on the validation users)."
  )
  assert "differ from its init LM" not in _verdict({**report, "hetlm_clusters_as_init": []})[0]
