"""HeTLM on synthetic users from distinct Markov behaviours: clusters recovered, better than one LM."""

import dataclasses
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import normalize
from synthetic import markov_events

from hetlm_jax import hosts, pipeline
from hetlm_jax.cluster import rounds as cluster_rounds
from hetlm_jax.cluster.assign import embedding_kmeans, kmeans, reassign
from hetlm_jax.config import ClusterConfig, Config, DataConfig, ModelConfig, TrainConfig
from hetlm_jax.data.ownership import user_keys
from hetlm_jax.pipeline import prepare_data, train_and_evaluate
from hetlm_jax.train import loop


def markov_config(path, **cluster):
  return Config(
    model=ModelConfig(context=32, d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0),
    train=TrainConfig(batch_size=16, epochs=3, learning_rate=1e-2, log_every=10),
    data=DataConfig(path=str(path)),
    cluster=ClusterConfig(k=3, tolerance=0.0, **{"init": "features", **cluster}),
  )


@pytest.fixture(scope="module")
def markov_log(tmp_path_factory):
  path = tmp_path_factory.mktemp("markov") / "events.parquet"
  table, group_U = markov_events(n_users=180, n_groups=3, n_pages=12, sessions=4, session_len=8, seed=1)
  pq.write_table(table, path)
  return path, group_U


def true_groups(cfg, group_U):
  seqs = prepare_data(cfg).seqs
  return seqs, group_U[np.array([int(u[1:]) for u in seqs.user_ids])]


def hetlm_rounds(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in records if r["kind"] == "round" and r["model"] == "hetlm"]


@pytest.fixture(scope="module")
def markov_run(markov_log, tmp_path_factory):
  """One HeTLM run (K=3, k-means initial clusters) on 3 planted behaviours, with its baselines."""
  path, group_U = markov_log
  root = tmp_path_factory.mktemp("markov_run")
  cfg = markov_config(path, rounds=3)
  report = train_and_evaluate(cfg, root / "run")
  seqs, truth = true_groups(cfg, group_U)
  rounds = hetlm_rounds(root / "run")
  assigned = pq.read_table(root / "run" / "assignments.parquet").to_pydict()
  return report, truth, rounds, assigned, seqs


def test_planted_clusters_are_recovered(markov_run):
  report, truth, rounds, assigned, seqs = markov_run
  assert assigned["user_id"] == seqs.user_ids.tolist()
  assert adjusted_rand_score(truth, assigned["cluster"]) >= 0.9


def test_hetlm_beats_the_single_lm_on_held_out_nll(markov_run):
  models = markov_run[0]["models"]
  assert models["hetlm"]["nll"]["mean"] < models["single"]["nll"]["mean"]


def test_reassignment_recovers_the_clusters_from_a_mostly_random_start(markov_log, tmp_path, monkeypatch):
  path, group_U = markov_log
  cfg = markov_config(path, rounds=4, baselines=False)
  seqs, truth = true_groups(cfg, group_U)
  rng = np.random.default_rng(0)
  start = np.where(rng.random(len(truth)) < 0.8, rng.integers(0, 3, len(truth)), truth).astype(np.int32)
  assert adjusted_rand_score(truth, start) < 0.1
  monkeypatch.setattr(cluster_rounds, "kmeans_on_features", lambda *args, **kwargs: start)
  trainers = []
  real_init = loop.Trainer.__init__

  def remember(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    trainers.append(self)

  monkeypatch.setattr(loop.Trainer, "__init__", remember)
  train_and_evaluate(cfg, tmp_path)
  assigned = pq.read_table(tmp_path / "assignments.parquet")["cluster"].to_numpy()
  assert adjusted_rand_score(truth, assigned) >= 0.9
  rounds = hetlm_rounds(tmp_path)
  moved = [r["moved"] for r in rounds]
  assert moved[-1] < moved[0]
  assert all(min(r["sizes"]) > 0 and sum(r["sizes"]) == seqs.num_users for r in rounds)
  # Users moved between rounds, yet the step and the scoring pass were each compiled once.
  (hetlm,) = trainers
  assert hetlm.train_step.jitted._cache_size() == 1 and hetlm.score_batch._cache_size() == 1


def test_single_matched_has_about_k_times_the_parameters(markov_run):
  params = markov_run[0]["params"]
  assert abs(params["single_matched"] - params["hetlm"]) <= 0.1 * params["hetlm"]
  assert params["hetlm"] == 3 * params["single"]


def test_reassign_moves_each_user_to_the_lowest_nll_model():
  nll = np.array([[1.0, 3.0, 2.0, 0.5], [2.0, 1.0, 1.0, 0.7]])
  r = reassign(nll, np.array([0, 0, 0, 0]), min_size=1)
  assert r.assignment.tolist() == [0, 1, 1, 0] and r.moved == 0.5 and r.reseeded == {}


def test_a_cluster_below_the_minimum_is_reseeded_from_the_largest():
  rng = np.random.default_rng(0)
  nll = rng.random((3, 40))
  nll[2] += 5  # model 2 explains nobody: its cluster would empty
  r = reassign(nll, np.zeros(40, np.int64), min_size=5)
  assert set(np.unique(r.assignment)) == {0, 1, 2} and r.sizes.min() >= 5 and r.sizes.sum() == 40
  largest = r.reseeded[2]
  assert r.source.tolist()[2] == largest
  # The users moved into the re-seeded cluster are those its donor explained worst.
  donors_before = np.flatnonzero(np.argmin(nll, axis=0) == largest)
  moved = np.flatnonzero(r.assignment == 2)
  assert nll[largest, moved].min() >= np.median(nll[largest, donors_before]) - 1e-12


@dataclasses.dataclass(frozen=True)
class _ThreadGroups(hosts.Groups):
  """Groups of a job simulated by threads: `each` swaps the arrays through shared slots."""

  slots: list = dataclasses.field(default_factory=list)
  barrier: threading.Barrier | None = None

  def each(self, *arrays):
    self.slots[self.index] = [np.asarray(a) for a in arrays]
    self.barrier.wait()
    every = list(self.slots)
    self.barrier.wait()  # nobody overwrites a slot before every group has read them all
    return every


def test_groups_that_each_reassign_their_own_users_end_as_one_reassignment_of_all_of_them():
  rng = np.random.default_rng(3)
  nll = np.round(rng.random((4, 90)), 1)  # rounded: donors tie on their NLL across the groups' borders
  nll[3] += 5  # model 3 explains nobody: re-seeded from the largest
  nll[2, :6] -= 0.5  # model 2 a few users: re-seeded too
  nll[2, 6:] += 0.6
  current = rng.integers(0, 4, 90)
  whole = reassign(nll, current, min_size=10)
  assert len(whole.reseeded) == 2  # the case the groups must agree on
  shares = np.array_split(np.arange(90), [25, 31])  # uneven, one of 6 users
  slots, barrier, out = [None] * 3, threading.Barrier(3), [None] * 3

  def group(g):
    groups = _ThreadGroups(g, 3, slots, barrier)
    out[g] = reassign(nll[:, shares[g]], current[shares[g]], min_size=10, groups=groups)

  threads = [threading.Thread(target=group, args=(g,)) for g in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=30)
  assert np.concatenate([r.assignment for r in out]).tolist() == whole.assignment.tolist()
  for r in out:
    assert r.moved == whole.moved and r.sizes.tolist() == whole.sizes.tolist()
    assert r.reseeded == whole.reseeded and r.source.tolist() == whole.source.tolist()


def test_embedding_init_warm_starts_every_cluster_model_from_the_single_lm(markov_log, tmp_path):
  import jax

  from hetlm_jax.train.metrics import MetricsLog

  path, group_U = markov_log
  cfg = markov_config(path, init="embedding", warm_start=True)
  prepared = prepare_data(cfg)
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size))
  initial, warm = cluster_rounds.initial_assignment(
    cfg, 3, prepared.seqs, prepared.tokenizer.vocab_size, tmp_path, MetricsLog(tmp_path / "m.jsonl"), validation=None
  )
  assignment, single_params = initial(), warm()
  assert sorted(np.unique(assignment)) == [0, 1, 2] and len(assignment) == prepared.seqs.num_users
  assert (tmp_path / "checkpoints" / "init_single").is_dir()
  warm = loop.Trainer(cfg, 3).warm_state(single_params)
  jax.tree.map(
    lambda stacked, single: np.testing.assert_array_equal(
      np.asarray(stacked), np.broadcast_to(np.asarray(single), stacked.shape)
    ),
    warm.params,
    single_params,
  )


def test_k_auto_trains_each_candidate_and_keeps_the_best_on_held_out_users(markov_log, tmp_path):
  path, _ = markov_log
  cfg = markov_config(path, rounds=1, baselines=False, k_candidates="2,3")
  cfg = cfg.replace(cluster=dataclasses.replace(cfg.cluster, k=0))
  report = train_and_evaluate(cfg, tmp_path)
  curve = {int(k): v for k, v in report["k_sweep"]["selection_nll"].items()}
  assert set(curve) == {2, 3} and report["k"] == min(curve, key=curve.get)
  assert report["n_users"] < prepare_data(cfg).seqs.num_users  # the selection users are left out
  assert (tmp_path / "nll_vs_k.png").exists()
  assert pipeline.load_run(tmp_path).params["cluster"]["embed"]["embedding"].shape[0] == report["k"]


def test_the_single_lm_is_the_warm_start_lm_when_trained_by_the_same_rules(markov_log, tmp_path):
  import jax

  from hetlm_jax.train.metrics import MetricsLog

  path, _ = markov_log
  cfg = markov_config(path)
  cfg = cfg.replace(train=dataclasses.replace(cfg.train, epochs=2))
  prepared = prepare_data(cfg)
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size))
  seqs, log = prepared.seqs, MetricsLog(tmp_path / "metrics.jsonl")
  zeros = lambda: np.zeros(seqs.num_users, np.int32)
  train = lambda name, rounds, source=None, c=cfg: cluster_rounds.train_family(
    name, c, 1, seqs, tmp_path, log, zeros, rounds, None, continue_from=source
  )
  init = train("init_single", 2)
  continued = train("single", 2, "init_single")
  assert [r["from"] for r in log.records("continued")] == ["init_single"]
  assert continued.rounds == init.rounds == 2 and continued.passes == init.passes == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(continued.params), jax.device_get(init.params))
  from hetlm_jax.train.checkpoint import Checkpoints

  steps = [Checkpoints(tmp_path / "checkpoints" / name, 3).latest_step() for name in ("single", "init_single")]
  assert steps[0] == steps[1] is not None  # a copy of its own, so it loads by its own name
  train("single_more", 3, "init_single")  # another cap of rounds: trained, not copied
  other = cfg.replace(train=dataclasses.replace(cfg.train, learning_rate=0.5))  # another config: trained too
  train("single_other", 2, "init_single", other)
  assert len(log.records("continued")) == 1


@pytest.mark.parametrize("early_stopping", [False, True])
def test_the_history_scores_kept_from_the_last_e_step_are_those_of_the_returned_models(
  markov_log, tmp_path, monkeypatch, early_stopping
):
  """The evaluation's mixture posterior reuses them instead of scoring every history again: they must be the
  scores of the parameters it evaluates. Without early stopping, the last round ends with an E-step; with it,
  the second round is made to find no pass better than its start, so it goes back to the parameters that the
  first round's E-step scored, and the rounds end there."""
  from hetlm_jax.train.metrics import MetricsLog

  if early_stopping:
    real_reassign, real_stats, after_e_step = cluster_rounds.e_step, cluster_rounds.Validation.stats, []

    def reassign(*args, **kwargs):
      after_e_step.append(True)
      return real_reassign(*args, **kwargs)

    def stats(self, *args):  # from the first E-step on, nothing beats the round's start
      return (0.0, 0.0) if after_e_step else real_stats(self, *args)

    monkeypatch.setattr(cluster_rounds, "e_step", reassign)
    monkeypatch.setattr(cluster_rounds.Validation, "stats", stats)

  path, _ = markov_log
  cfg = markov_config(path, rounds=2)
  cfg = cfg.replace(train=dataclasses.replace(cfg.train, patience=1 if early_stopping else 0, epochs=2))
  prepared = prepare_data(cfg)
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size))
  seqs, validation, _ = pipeline.validation_slice(cfg, prepared)
  log = MetricsLog(tmp_path / "metrics.jsonl")
  trained = cluster_rounds.train_hetlm(
    cfg, 3, seqs, prepared.tokenizer.vocab_size, tmp_path, log, validation if early_stopping else None
  )
  stops = [r for r in log.records("stop") if r["round_kind"] == "cold"]  # an anneal may follow, and not improve
  assert len(stops) == 2 and len(log.records("round")) == (1 if early_stopping else 2)
  assert stops[0]["best_pass"] > 0 and (stops[1]["best_pass"] == 0) == early_stopping
  users, history_KxR = trained.history_share
  assert history_KxR.shape == (3, seqs.num_users) and users.tolist() == list(range(seqs.num_users))
  fresh, _ = trained.trainer.score(trained.params, seqs, "history")
  np.testing.assert_allclose(history_KxR, fresh, rtol=1e-6)


def test_embedding_kmeans_past_its_users_fits_a_sample_drawn_by_id_and_places_every_user_at_the_nearest_centre():
  from score_in_processes import CFG, users

  seqs, trainer = users(), loop.Trainer(CFG, 1)
  params = trainer.init_state().params
  x = normalize(trainer.embed(params, seqs)[0])
  assert (embedding_kmeans(trainer, params, seqs, 3, 0, most_users=150) == kmeans(x, 3, 0)).all()  # every user
  sampled = embedding_kmeans(trainer, params, seqs, 3, 0, most_users=40)
  fitted = np.sort(np.argsort(user_keys(pa.array(seqs.user_ids.astype(str)), 0, 13))[:40])
  centres = KMeans(3, n_init=4, random_state=0).fit(normalize(trainer.embed(params, seqs.subset(fitted))[0]))
  nearest = np.argmin(((x[:, None, :] - centres.cluster_centers_[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(sampled, nearest)
  assert sorted(set(sampled.tolist())) == [0, 1, 2] and not np.isin(np.arange(150), fitted).all()
