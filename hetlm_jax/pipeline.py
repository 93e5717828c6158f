"""train_and_evaluate(config, workdir): the whole job, callable without a command line.

Stages: read and tokenise the log → train HeTLM (K stacked models, reassignment rounds) → train the
single-LM baselines with the same schedule → evaluate every model on each user's held-out target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging
from scipy.special import logsumexp

from hetlm_jax.cluster.assign import kmeans, kmeans_on_features, min_cluster_size, random_balanced, reassign
from hetlm_jax.config import Config, ModelConfig, validate
from hetlm_jax.data import SAMPLE_PATH
from hetlm_jax.data.readers import read_events
from hetlm_jax.data.sequences import UserSequences, build_sequences, outcome_types, split_users
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.errors import HetlmError
from hetlm_jax.eval.evaluate import LMFamily, evaluate, per_user_nll, route_by_history
from hetlm_jax.eval.generate import Sampling, generate
from hetlm_jax.eval.new_users import evaluate_new_users
from hetlm_jax.model import matched_config, param_count
from hetlm_jax.train.batches import ClusterBatches
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.train.split import num_models, part_sizes
from hetlm_jax.train.state import cluster_spec, make_mesh

# Settings that may differ when the same run is resumed; everything else must match the saved config.
_RESUMABLE_CHANGES = {("train", "log_every"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
                      ("train", "eval_batch_size"), ("model", "vocab_size")}
_SELECTION_FRACTION = 0.1  # --k=auto: users whose targets choose K, left out of the reported evaluation


@dataclasses.dataclass
class Prepared:
  seqs: UserSequences
  tokenizer: PageTokenizer
  stats: dict
  seconds: float
  int_user_ids: bool  # the input's user ids were integers (assignments.parquet keeps them so)
  test_seqs: UserSequences | None = None  # the split by user (--test_users): new users, whole sequences


@dataclasses.dataclass
class Trained:
  """One trained model family: K stacked models (K=1 for a single LM) and their users' clusters."""
  name: str
  cfg: Config
  trainer: Trainer
  params: object
  assignment: np.ndarray
  rounds: int
  train_s: float
  weights: np.ndarray | None = None  # [U, K] soft-EM responsibilities (--soft), else None


def cluster_shares(assignment_U: np.ndarray, weights_UxK: np.ndarray | None, k: int) -> np.ndarray:
  """[K] the clusters' shares of users: mean responsibilities under soft EM, else of the assignment."""
  if weights_UxK is not None:
    return weights_UxK.mean(axis=0)
  return np.bincount(assignment_U, minlength=k) / max(len(assignment_U), 1)


def data_path(cfg: Config) -> str:
  return cfg.data.path or str(SAMPLE_PATH)


def prepare_data(cfg: Config, tokenizer: PageTokenizer | None = None) -> Prepared:
  """Reads the log and builds per-user sequences; fits the tokenizer on the training histories unless one
  is given (pages seen only in held-out targets or test users are unknown to the models, so UNK)."""
  d = cfg.data
  path = data_path(cfg)
  start = time.perf_counter()
  table = read_events(path, d.format, max_users=d.max_users or None)
  given = tokenizer is not None
  if not given:  # every page for now; which events train is known only once the sequences are built
    tokenizer = PageTokenizer.fit(table["page"], outcome_types(table))
  holdout = "none" if d.test_users else d.holdout
  seqs, stats = build_sequences(table, tokenizer, session_gap_s=d.session_gap_minutes * 60, holdout=holdout)
  int_ids = (table.schema.metadata or {}).get(b"hetlm_user_id") == b"int64"
  test_seqs = None
  if d.test_users:
    if d.train_users + d.test_users > seqs.num_users or seqs.num_users - d.test_users < 1:
      raise HetlmError(f"{path}: {seqs.num_users:,} users, too few for --train_users={d.train_users} and "
                       f"--test_users={d.test_users}")
    seqs, test_seqs = split_users(seqs, d.train_users, d.test_users, d.split_seed)
    stats.update(users=seqs.num_users, test_users=test_seqs.num_users, test_tokens=test_seqs.num_tokens)
  if not given:
    # A training user's history is all that trains (split_users makes a training user's whole sequence
    # history); min_count and max_vocab apply to those counts.
    counts_V = seqs.history_counts(tokenizer.vocab_size)
    stats["pages_never_in_training"] = int((counts_V[tokenizer.num_specials:] == 0).sum())
    tokenizer, map_V = tokenizer.restrict(counts_V, d.min_count, d.max_vocab or None)
    seqs = seqs.map_tokens(map_V)
    test_seqs = test_seqs.map_tokens(map_V) if test_seqs is not None else None
  return Prepared(seqs, tokenizer, stats, time.perf_counter() - start, int_ids, test_seqs)


def _check_resumable(saved: Config, cfg: Config, workdir: Path) -> None:
  a, b = saved.to_dict(), cfg.to_dict()
  diffs = [f"--{key}" for section in a for key in a[section]
           if a[section][key] != b[section].get(key) and (section, key) not in _RESUMABLE_CHANGES]
  if diffs:
    raise HetlmError(f"{workdir}: holds a run with different settings ({', '.join(diffs)}); "
                     "pass the same flags to resume it, or use a new --workdir")


def write_assignments(path: Path, seqs: UserSequences, assignment: np.ndarray, int_ids: bool) -> None:
  """assignments.parquet (user_id as in the input, cluster), replaced atomically."""
  ids = pa.array(seqs.user_ids.astype(np.int64) if int_ids else seqs.user_ids.astype(str))
  tmp = path.with_suffix(".parquet.tmp")
  pq.write_table(pa.table({"user_id": ids, "cluster": pa.array(assignment, pa.int32())}), tmp)
  os.replace(tmp, path)


def train_model(name: str, cfg: Config, k: int, seqs: UserSequences, workdir: Path, log: MetricsLog,
                initial_assignment, rounds: int, on_round=None, warm_params=lambda: None) -> Trained:
  """Trains (or resumes) one model family in WORKDIR/checkpoints/NAME for at most `rounds` rounds.

  With K > 1, every round ends by scoring each user's history under every model and moving the user
  to the lowest-perplexity one; training stops early once fewer than `tolerance` of users move.
  `initial_assignment()` and `warm_params()` are called only when there is no checkpoint to resume.
  """
  c = cfg.cluster
  trainer = Trainer(cfg, k)
  ckpts = Checkpoints(workdir / "checkpoints" / name, cfg.train.keep_checkpoints)
  if ckpts.latest_step() is not None:
    state, assignment, meta, weights = ckpts.restore(trainer.abstract, seqs.num_users)
    round_index, done = int(meta["round"]), bool(meta["done"])
    logging.info("%s: resuming at step %d, round %d", name, int(state.step), round_index + 1)
  else:
    warm = warm_params()
    state = trainer.init_state() if warm is None else trainer.warm_state(warm)
    assignment, weights, round_index, done = initial_assignment(), None, 0, False

  def save(state, step, round_index, done):
    ckpts.save(state, assignment, {"step": step, "round": round_index, "done": done, "num_users": seqs.num_users,
                                   "k": k, "cluster_params": cluster_spec(cfg, k),
                                   "model": dataclasses.asdict(cfg.model)}, weights)

  def periodic_save(state, step):
    if step % cfg.train.checkpoint_every == 0:
      save(state, step, round_index, False)

  min_size = min_cluster_size(seqs.num_users, k, c.min_cluster_frac)
  start = time.perf_counter()
  while not done:
    batches = ClusterBatches(seqs, assignment, k, cfg.train.batch_size, cfg.model.context, cfg.train.epochs,
                             cfg.train.seed, round_index, weights)
    if trainer.round_finished(state):
      state = trainer.start_round(state, batches.steps)
    state = trainer.train_round(state, batches, log, on_step=periodic_save,
                                label=f"{name} round {round_index + 1}/{rounds}")
    round_index += 1
    done = round_index >= rounds
    if k > 1:
      nll_KxU, tokens_U = trainer.score(state.params, seqs, "history", label=f"{name} scoring")
      nll_per_token_KxU = nll_KxU / np.maximum(tokens_U, 1)
      if c.soft:  # the posterior over clusters of each user's history, with the clusters' shares as prior
        log_joint_KxU = np.log(np.maximum(cluster_shares(assignment, weights, k), 1e-12))[:, None] - nll_KxU
        moved = reassign(-log_joint_KxU / np.maximum(tokens_U, 1), assignment, min_size)
        weights = np.exp(log_joint_KxU - logsumexp(log_joint_KxU, axis=0)).T
        # Users that re-seeding moved away from their most likely cluster belong to the new one alone.
        forced = np.flatnonzero(moved.assignment != np.argmax(weights, axis=1))
        weights[forced] = np.eye(k)[moved.assignment[forced]]
      else:
        moved = reassign(nll_per_token_KxU, assignment, min_size)
      if moved.reseeded:
        state = trainer.copy_models(state, moved.source)
        logging.warning("%s: re-seeded clusters %s by splitting %s (they fell below %d users)", name,
                        sorted(moved.reseeded), sorted(set(moved.reseeded.values())), min_size)
      own = nll_per_token_KxU[moved.assignment, np.arange(seqs.num_users)]
      record = {"kind": "round", "model": name, "round": round_index, "moved": moved.moved,
                "sizes": moved.sizes.tolist(), "reseeded": {str(a): b for a, b in moved.reseeded.items()},
                "history_nll_per_cluster": [float(own[moved.assignment == j].mean()) if moved.sizes[j] else None
                                            for j in range(k)],
                "history_nll": float(own.mean())}
      log.write(record)
      logging.info("%s round %d: %.2f%% of users moved; sizes %s; history NLL %.4f", name, round_index,
                   100 * moved.moved, moved.sizes.tolist(), record["history_nll"])
      assignment = moved.assignment
      done = done or moved.moved < c.tolerance
    if on_round is not None:
      on_round(assignment)
    save(state, int(state.step), round_index, done)
  train_s = time.perf_counter() - start
  ckpts.close()
  return Trained(name, cfg, trainer, state.params, assignment, round_index, train_s, weights)


def _initial_assignment(cfg: Config, k: int, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog):
  """The --init strategy as (assignment, warm-start params) thunks; 'embedding' first trains a single LM
  (--init_rounds rounds, its own checkpoints) whose mean hidden states are clustered and, with --warm_start,
  copied."""
  c, seed = cfg.cluster, cfg.train.seed
  no_warm = lambda: None
  if k == 1:
    return (lambda: np.zeros(seqs.num_users, np.int32)), no_warm
  if c.init == "random":
    return (lambda: random_balanced(seqs.num_users, k, seed)), no_warm
  if c.init == "features":
    return (lambda: kmeans_on_features(seqs, vocab_size, k, seed)), no_warm

  @functools.lru_cache(maxsize=1)
  def single():
    return train_model("init_single", cfg, 1, seqs, workdir, log, lambda: np.zeros(seqs.num_users, np.int32),
                       c.init_rounds)

  initial = lambda: kmeans(single().trainer.embed(single().params, seqs)[0], k, seed)
  return initial, ((lambda: single().params) if c.warm_start else no_warm)


def train_hetlm(cfg: Config, k: int, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog,
                name: str = "hetlm", on_round=None) -> Trained:
  initial, warm = _initial_assignment(cfg, k, seqs, vocab_size, workdir, log)
  rounds = cfg.cluster.rounds if k > 1 else 1
  if warmed(cfg, k):  # fine-tuning from a trained LM: a gentler learning rate keeps what it learned
    cfg = cfg.replace(train=dataclasses.replace(cfg.train,
                                                learning_rate=cfg.train.learning_rate * cfg.cluster.warm_lr_scale))
  return train_model(name, cfg, k, seqs, workdir, log, initial, rounds, on_round=on_round, warm_params=warm)


def warmed(cfg: Config, k: int) -> bool:
  """Whether HeTLM's K models start from a single LM trained first ('init_single')."""
  return k > 1 and cfg.cluster.init == "embedding" and cfg.cluster.warm_start


def _choose_k(cfg: Config, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog):
  """--k=auto: a full HeTLM per candidate K, judged on the targets of a fixed 10% of users."""
  select_U = np.random.default_rng([cfg.train.seed, 7]).random(seqs.num_users) < _SELECTION_FRACTION
  curve, runs = {}, {}
  for k in cfg.cluster.candidates():
    run = train_hetlm(cfg, k, seqs, vocab_size, workdir, log, name=f"hetlm_k{k}")
    curve[k] = float(per_user_nll(run, seqs)[0][select_U].mean())
    runs[k] = run
    log.write({"kind": "k_sweep", "k": k, "selection_nll": curve[k], "rounds": run.rounds})
    logging.info("K=%d: selection NLL %.4f", k, curve[k])
  best = min(curve, key=curve.get)
  # The chosen K's checkpoints stay under hetlm_kK; this file tells load_run that they are "hetlm".
  (workdir / "k_auto.json").write_text(json.dumps({"k": best, "selection_nll": curve}) + "\n")
  return runs[best], curve, ~select_U


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
  """Trains (or resumes) the run in `workdir`, writes eval.json and returns it; validates everything first."""
  validate(cfg)
  workdir = Path(workdir)
  if (workdir / "config.json").exists():
    _check_resumable(Config.load(workdir / "config.json"), cfg, workdir)
  tokenizer = PageTokenizer.load(workdir / "tokenizer.json") if (workdir / "tokenizer.json").exists() else None
  prepared = prepare_data(cfg, tokenizer)
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  c = cfg.cluster
  ks = [c.k] if c.k else c.candidates()
  if max(ks) > seqs.num_users:
    raise HetlmError(f"--k={max(ks)} is more than the {seqs.num_users} usable users in {data_path(cfg)}")
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size,
                                              output_bias=c.cluster_params != "all", lora_rank=c.lora_rank()))
  for k in ks:  # checks the mesh against the flags before anything is written
    make_mesh(cfg, k)

  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer.save(workdir / "tokenizer.json")
  cfg.save(workdir / "config.json")
  log = MetricsLog(workdir / "metrics.jsonl")
  n_shared, n_own = part_sizes(cfg.model, c.cluster_params)
  n_params = n_shared + n_own
  events = prepared.stats.get("events", 0)
  logging.info("data: %s users (%s dropped as too short), %s events, vocab %d, prepared in %.1fs (%.0f events/s)",
               f"{seqs.num_users:,}", f"{prepared.stats.get('users_dropped_too_short', 0):,}", f"{events:,}",
               tokenizer.vocab_size, prepared.seconds, events / max(prepared.seconds, 1e-9))
  log.write({"kind": "start", "users": seqs.num_users, "vocab_size": tokenizer.vocab_size, "params": n_params,
             "k": c.k or "auto", "data": prepared.stats, "prepare_s": prepared.seconds})

  assignments_path = workdir / "assignments.parquet"
  on_round = lambda assignment: write_assignments(assignments_path, seqs, assignment, prepared.int_user_ids)
  evaluated_U, k_curve = np.ones(seqs.num_users, bool), None
  if c.k == 0:
    hetlm, k_curve, evaluated_U = _choose_k(cfg, seqs, tokenizer.vocab_size, workdir, log)
    on_round(hetlm.assignment)
  else:
    hetlm = train_hetlm(cfg, c.k, seqs, tokenizer.vocab_size, workdir, log, on_round=on_round)
  k = hetlm.trainer.k
  models = {"hetlm": hetlm}
  total = n_shared + k * n_own if k > 1 else n_params
  params = {"hetlm": total}
  parts = {"cluster_params": c.cluster_params, "shared": n_shared if k > 1 else 0,
           "per_cluster": n_own if k > 1 else n_params}
  if c.baselines and k > 1:
    single_model = dataclasses.replace(cfg.model, lora_rank=0)  # adapters are a cluster's own: a single LM has none
    matched_model = matched_config(single_model, total)
    logging.info("parameters: HeTLM %s (shared %s + K=%d × %s own) · single %s · single_matched %s (d_model %d, "
                 "%d layers)", f"{total:,}", f"{n_shared:,}", k, f"{n_own:,}", f"{param_count(single_model):,}",
                 f"{param_count(matched_model):,}", matched_model.d_model, matched_model.n_layers)
    zeros = lambda: np.zeros(seqs.num_users, np.int32)
    # Same code path with K=1, same epochs per round, and as many passes over every user as HeTLM made
    # (its rounds, plus those of the single LM it started from).
    single_rounds = hetlm.rounds + (c.init_rounds if warmed(cfg, k) else 0)
    for name, model_cfg in (("single", single_model), ("single_matched", matched_model)):
      models[name] = train_model(name, cfg.replace(model=model_cfg), 1, seqs, workdir, log, zeros, single_rounds)
      params[name] = param_count(model_cfg)

  extra = {"k": k, "rounds": hetlm.rounds, "params": params, "hetlm_params": parts, "data": data_path(cfg),
           "train_s": {name: m.train_s for name, m in models.items()}}
  if k_curve is not None:
    extra["k_sweep"] = {"selection_nll": {str(key): v for key, v in k_curve.items()},
                        "note": "K chosen on the targets of a random 10% of users, left out of n_users"}
  families = {name: LMFamily(name, m.trainer, m.params, m.assignment,
                             cluster_shares(m.assignment, m.weights, m.trainer.k)) for name, m in models.items()}
  rounds = [r for r in log.records("round") if r["model"] == hetlm.name]
  if prepared.test_seqs is not None:
    report = evaluate_new_users(families, seqs, prepared.test_seqs, tokenizer, workdir, extra=extra, rounds=rounds)
  else:
    report = evaluate(families, seqs, tokenizer, workdir, evaluated_U, extra=extra, rounds=rounds)
  for name, summary in report["models"].items():
    logging.info("%-15s held-out NLL %.4f ± %.4f nats/token", name, summary["nll"]["mean"], summary["nll"]["std"])
  for name, bits in report.get("bits_per_token", {}).items():
    logging.info("%-22s %.4f bits/page token (no end marker), %.4f with it", name, bits["no_end"], bits["with_end"])
  log.write({"kind": "eval", "models": {name: m["nll"] for name, m in report["models"].items()}})
  return report


@dataclasses.dataclass
class TrainedRun:
  config: Config
  tokenizer: PageTokenizer
  params: object  # stacked: leading K axis
  assignment: np.ndarray  # cluster of each user, in the order of the training data's users
  step: int
  weights: np.ndarray | None = None  # [U, K] soft-EM responsibilities (--soft), else None


def load_run_name(workdir: Path, model: str) -> str:
  """The checkpoint folder of a model family: with --k=auto, "hetlm" is the chosen hetlm_kK."""
  if model == "hetlm" and (workdir / "k_auto.json").exists():
    return f"hetlm_k{json.loads((workdir / 'k_auto.json').read_text())['k']}"
  return model


def load_run(workdir: str | Path, model: str = "hetlm") -> TrainedRun:
  """Loads a trained model family from its workdir alone (config.json, tokenizer.json, latest checkpoint)."""
  workdir = Path(workdir)
  for name in ("config.json", "tokenizer.json"):
    if not (workdir / name).exists():
      raise HetlmError(f"{workdir}: no {name}; is this a hetlm workdir?")
  cfg = Config.load(workdir / "config.json")
  tokenizer = PageTokenizer.load(workdir / "tokenizer.json")
  model = load_run_name(workdir, model)
  ckpts = Checkpoints(workdir / "checkpoints" / model, cfg.train.keep_checkpoints)
  if ckpts.latest_step() is None:
    raise HetlmError(f"{workdir}: no checkpoint of {model} yet")
  meta = ckpts.meta()  # each model family records its own K and model config
  cfg = cfg.replace(model=ModelConfig(**meta["model"]))
  trainer = Trainer(cfg, int(meta["k"]))
  state, assignment, meta, weights = ckpts.restore(trainer.abstract, int(meta["num_users"]))
  ckpts.close()
  return TrainedRun(cfg, tokenizer, state.params, assignment, int(meta["step"]), weights)


def _families_for(workdir: Path, seqs: UserSequences) -> dict[str, LMFamily]:
  """Every trained model family in `workdir`, with each user of `seqs` routed to one of its models:
  by the saved assignment when the user was trained on, else by the perplexity of their history."""
  families = {}
  for name in ("hetlm", "single", "single_matched"):
    try:
      run = load_run(workdir, name)
    except HetlmError:
      continue
    k = num_models(run.params)
    family = LMFamily(name, Trainer(run.config, k), run.params, np.zeros(seqs.num_users, np.int32),
                      cluster_shares(run.assignment, run.weights, k))
    if k > 1:
      family.assignment = _saved_or_routed(workdir, family, seqs)
    families[name] = family
  if not families:
    raise HetlmError(f"{workdir}: no trained model under checkpoints/; run `hetlm train` first")
  return families


def _saved_or_routed(workdir: Path, family: LMFamily, seqs: UserSequences) -> np.ndarray:
  assignment_U = np.full(seqs.num_users, -1, np.int32)
  if (workdir / "assignments.parquet").exists():
    saved = pq.read_table(workdir / "assignments.parquet")
    saved_ids = pc.cast(saved["user_id"], pa.string())
    found_U = pc.fill_null(pc.index_in(pa.array(seqs.user_ids.astype(str)), value_set=saved_ids), -1).to_numpy()
    known_U = found_U >= 0
    assignment_U[known_U] = saved["cluster"].to_numpy()[found_U[known_U]]
  unknown = np.flatnonzero(assignment_U < 0)
  if len(unknown):  # users the models never saw: the lowest perplexity of their history
    assignment_U[unknown] = route_by_history(family, seqs.subset(unknown))
  return assignment_U


def _workdir_data(workdir: Path, data: str | None) -> tuple[Config, Prepared]:
  for name in ("config.json", "tokenizer.json"):
    if not (workdir / name).exists():
      raise HetlmError(f"{workdir}: no {name}; is this a hetlm workdir?")
  cfg = Config.load(workdir / "config.json")
  if data:
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, path=data, format="auto"))
  return cfg, prepare_data(cfg, PageTokenizer.load(workdir / "tokenizer.json"))


def evaluate_workdir(workdir: str | Path, data: str | None = None) -> dict:
  """`hetlm evaluate`: re-evaluates every trained model in `workdir` on its data, or on `data`."""
  workdir = Path(workdir)
  cfg, prepared = _workdir_data(workdir, data)
  families = _families_for(workdir, prepared.seqs)
  log = MetricsLog(workdir / "metrics.jsonl")
  hetlm_name = load_run_name(workdir, "hetlm")
  rounds = [r for r in log.records("round") if r["model"] == hetlm_name]
  extra = {"data": data_path(cfg)}
  if prepared.test_seqs is not None:
    return evaluate_new_users(families, prepared.seqs, prepared.test_seqs, prepared.tokenizer, workdir,
                              extra=extra, rounds=rounds)
  return evaluate(families, prepared.seqs, prepared.tokenizer, workdir, rounds=rounds, extra=extra)


def generate_for_user(workdir: str | Path, user: str, data: str | None = None,
                      sampling: Sampling = Sampling()) -> dict:
  """`hetlm generate`: the user's history, their next session generated by their cluster's model, the actual one."""
  workdir = Path(workdir)
  cfg, prepared = _workdir_data(workdir, data)
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  matches = np.flatnonzero(seqs.user_ids.astype(str) == str(user))
  if len(matches) == 0:
    raise HetlmError(f"{data_path(cfg)}: no user {user!r} with enough events to hold out a next session")
  one = seqs.subset(matches[:1])
  family = _families_for(workdir, one)["hetlm"]
  generated = generate(family.trainer.cfg.model, family.params, one, family.assignment, np.array([0]), sampling,
                       seed=cfg.train.seed)[0]
  return {"user": str(user), "cluster": int(family.assignment[0]), "history": tokenizer.decode(one.history(0)),
          "generated": tokenizer.decode(generated), "actual": tokenizer.decode(one.target(0))}
