"""train_and_evaluate(config, workdir): the whole job, callable without a command line.

Stages: read and tokenise the log → train HeTLM (K stacked models, reassignment rounds) → train the
single-LM baselines with the same schedule → evaluate every model on each user's held-out target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging

from hetlm_jax import hosts
from hetlm_jax.cluster import tuning as tuning_grids
from hetlm_jax.cluster.assign import cluster_shares
from hetlm_jax.cluster.rounds import Validation, train_family, train_hetlm, train_single_ft, warmed
from hetlm_jax.config import FLAG_NAMES, Config, ModelConfig, validate
from hetlm_jax.data import SAMPLE_PATH
from hetlm_jax.data.readers import read_events
from hetlm_jax.data.sequences import (UserSequences, build_sequences, held_out_users, outcome_types, routing_split,
                                      spare_users, split_users)
from hetlm_jax.data.tokenizer import BOS, EOS, PageTokenizer
from hetlm_jax.errors import HetlmError
from hetlm_jax.eval.evaluate import LMFamily, evaluate, route_by_history
from hetlm_jax.eval.generate import Sampling, generate, session_length_from_data
from hetlm_jax.eval.new_users import evaluate_new_users
from hetlm_jax.files import replace_text, written
from hetlm_jax.lock import hold
from hetlm_jax.model import matched_config, param_count
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train import interrupt
from hetlm_jax.train.metrics import MetricsLog, tensorboard_available
from hetlm_jax.train.split import num_models, part_sizes
from hetlm_jax.train.state import make_mesh

# Settings that may differ when the same run is resumed; everything else must match the saved config.
_RESUMABLE_CHANGES = {("train", "log_every"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
                      ("train", "eval_batch_size"), ("train", "prefetch"), ("train", "stack"), ("train", "tensorboard"),
                      ("model", "vocab_size"),
                      ("model", "output_bias"), ("model", "lora_rank")}  # the last three are derived


@dataclasses.dataclass
class Prepared:
  seqs: UserSequences
  tokenizer: PageTokenizer
  stats: dict
  seconds: float
  int_user_ids: bool  # the input's user ids were integers (assignments.parquet keeps them so)
  test_seqs: UserSequences | None = None  # the split by user (--test_users): new users, whole sequences
  val_seqs: UserSequences | None = None  # split by user: unused users after the test users, for validation


def data_path(cfg: Config) -> str:
  return cfg.data.path or str(SAMPLE_PATH)


def prepare_data(cfg: Config, tokenizer: PageTokenizer | None = None) -> Prepared:
  """Reads the log and builds per-user sequences; fits the tokenizer on the training histories unless one
  is given (pages seen only in held-out targets or test users are unknown to the models, so UNK)."""
  d = cfg.data
  path = data_path(cfg)
  start = time.perf_counter()
  table = read_events(path, d.format, max_users=d.max_users or None)
  interrupt.at_phase("prepare")
  given = tokenizer is not None
  if not given:  # every page for now; which events train is known only once the sequences are built
    outcomes = outcome_types(table)
    if not outcomes and pc.count_distinct(table["page"]).as_py() < 2:
      raise HetlmError(f"{path}: every event has the same page ({table['page'][0].as_py()[:60]!r}), so there is "
                       "nothing to predict; is 'page' the right column?")
    tokenizer = PageTokenizer.fit(table["page"], outcomes)
  holdout = "none" if d.test_users else d.holdout
  seqs, stats = build_sequences(table, tokenizer, session_gap_s=d.session_gap_minutes * 60, holdout=holdout)
  int_ids = (table.schema.metadata or {}).get(b"hetlm_user_id") == b"int64"
  test_seqs = val_seqs = None
  if d.test_users:
    if (d.train_users + d.test_users > seqs.num_users or seqs.num_users - d.test_users < 1
        or d.test_offset + d.test_users > seqs.num_users):
      offset = f", --test_offset={d.test_offset}" if d.test_offset >= 0 else ""
      raise HetlmError(f"{path}: {seqs.num_users:,} users, too few for --train_users={d.train_users} and "
                       f"--test_users={d.test_users}{offset}")
    spare = spare_users(seqs.num_users, d.train_users, d.test_users, round(cfg.train.val_frac * d.train_users),
                        d.split_seed, d.test_offset)
    val_seqs = None if spare is None or not len(spare) else held_out_users(seqs, spare)
    seqs, test_seqs = split_users(seqs, d.train_users, d.test_users, d.split_seed, d.test_offset)
    stats.update(users=seqs.num_users, test_users=test_seqs.num_users, test_tokens=test_seqs.num_tokens)
  if not given:
    # A training user's history is all that trains (split_users makes a training user's whole sequence
    # history); min_count and max_vocab apply to those counts.
    counts_V = seqs.history_counts(tokenizer.vocab_size)
    stats["pages_never_in_training"] = int((counts_V[tokenizer.num_specials:] == 0).sum())
    tokenizer, map_V = tokenizer.restrict(counts_V, d.min_count, d.max_vocab or None)
    seqs = seqs.map_tokens(map_V)
    test_seqs, val_seqs = (None if x is None else x.map_tokens(map_V) for x in (test_seqs, val_seqs))
  interrupt.safe_point("while preparing the data", "nothing was written")
  return Prepared(seqs, tokenizer, stats, time.perf_counter() - start, int_ids, test_seqs, val_seqs)


SESSIONS_FILE = "sessions.json"


def write_sessions(workdir: Path, seqs: UserSequences, tokenizer: PageTokenizer) -> None:
  """sessions.json: whether the training histories end their sessions (so a prediction asks for the next
  session's pages) or not (one session per user, as msnbc: it asks how the last session goes on), and then how
  many pages to generate (see session_length_from_data)."""
  length = session_length_from_data(seqs, tokenizer.num_specials)
  replace_text(workdir / SESSIONS_FILE, json.dumps({"session_ends": length is None, "session_length": length}) + "\n")


def read_sessions(workdir: Path) -> dict:
  """sessions.json of a run (a run from before it existed: sessions end, no length limit)."""
  try:
    return json.loads((workdir / SESSIONS_FILE).read_text())
  except (OSError, ValueError):
    return {"session_ends": True, "session_length": None}


def _check_resumable(saved: Config, cfg: Config, workdir: Path) -> None:
  a, b = saved.to_dict(), cfg.to_dict()
  diffs = [f"--{FLAG_NAMES.get(key, key)}: {a[section][key]} there, {b[section].get(key)} now" for section in a
           for key in a[section] if a[section][key] != b[section].get(key) and (section, key) not in _RESUMABLE_CHANGES]
  if diffs:
    raise HetlmError(f"{workdir}: holds a run with different settings ({', '.join(diffs)}); "
                     "pass the same flags to resume it, or use a new --workdir")


def write_assignments(path: Path, seqs: UserSequences, assignment: np.ndarray, int_ids: bool) -> None:
  """assignments.parquet (user_id as in the input, cluster), replaced atomically; by process 0 alone."""
  if not hosts.is_primary():
    return
  ids = pa.array(seqs.user_ids.astype(np.int64) if int_ids else seqs.user_ids.astype(str))
  with written(path) as tmp:
    pq.write_table(pa.table({"user_id": ids, "cluster": pa.array(assignment, pa.int32())}), tmp)


def _choose_k(cfg: Config, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog,
              validation: Validation):
  """--k=auto: a full HeTLM per candidate K, judged on the validation users' held-out targets."""
  curve, runs = {}, {}
  for k in cfg.cluster.candidates():
    run = train_hetlm(cfg, k, seqs, vocab_size, workdir, log, validation, name=f"hetlm_k{k}")
    curve[k] = validation.nll(run.trainer, run.params, run.assignment, run.weights)
    runs[k] = run
    log.write({"kind": "k_sweep", "k": k, "selection_nll": curve[k], "rounds": run.rounds})
    logging.info("K=%d: validation NLL %.4f", k, curve[k])
  best = min(curve, key=curve.get)
  # The chosen K's checkpoints stay under hetlm_kK; this file tells load_run that they are "hetlm".
  if hosts.is_primary():
    replace_text(workdir / "k_auto.json", json.dumps({"k": best, "selection_nll": curve}) + "\n")
  return runs[best], curve


def validation_slice(cfg: Config, prepared: Prepared) -> tuple[UserSequences, Validation | None, np.ndarray]:
  """The users whose held-out targets decide early stopping and --k=auto: (training users, validation, the
  training users the evaluation reports on).

  Split in time: a fixed random --val_frac of the training users; they keep training on their histories
  and are left out of the evaluation. Split by user: --val_frac x --train_users users the split leaves
  unused, else that share of the training users, taken out of training; their whole sequences are held
  out, as the test users' are."""
  seqs = prepared.seqs
  if prepared.val_seqs is not None:
    return seqs, Validation(prepared.val_seqs, None), np.ones(seqs.num_users, bool)
  val_U = np.random.default_rng([cfg.train.seed, 7]).random(seqs.num_users) < cfg.train.val_frac
  if not val_U.any() or val_U.all():
    return seqs, None, np.ones(seqs.num_users, bool)
  if cfg.data.test_users:
    return (seqs.subset(~val_U), Validation(held_out_users(seqs, np.flatnonzero(val_U)), None),
            np.ones(int((~val_U).sum()), bool))
  return seqs, Validation(seqs.subset(val_U), np.flatnonzero(val_U)), ~val_U


def _kept_its_init_lm(log: MetricsLog, name: str, warm: bool) -> bool:
  """Whether no round of HeTLM found a point better than where it started, so its K models are copies of the
  single LM it was warm-started from."""
  stops = [r for r in log.records("stop") if r["model"] == name]
  interpolated = [r for r in log.records("interpolate") if r["model"] == name]
  mixed = [r for r in log.records("mix") if r["model"] == name]
  back = (bool(interpolated) and not any(interpolated[-1]["alpha"]) and not interpolated[-1]["alpha_shared"]
          or bool(mixed) and not any(mixed[-1]["lam"]))  # interpolated, or mixed, all the way back to it
  return warm and bool(stops) and (back or not any(r.get("improved", r.get("best_pass")) for r in stops))


MIN_FREE_BYTES = 100 * 2**20  # a run's checkpoints and outputs need at least this much room to start


def check_workdir(workdir: Path) -> None:
  """Refuses a --workdir that is a file, lies under a file, cannot be written or sits on a full disk."""
  existing = workdir
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == workdir else f"lies under {existing}, which is a file"
    raise HetlmError(f"--workdir={workdir} {where}, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise HetlmError(f"--workdir={workdir}: {existing} is not writable")
  free = shutil.disk_usage(existing).free
  if free < MIN_FREE_BYTES:
    raise HetlmError(f"--workdir={workdir}: the disk is full ({free / 2**20:.0f} MiB free; a run needs "
                     f"{MIN_FREE_BYTES // 2**20} MiB to start)")


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
  """Trains (or resumes) the run in `workdir`, writes eval.json and returns it; validates everything first, then
  holds the workdir (lock.py) until it returns."""
  with interrupt.stop_handler(), contextlib.ExitStack() as held:
    return _train_and_evaluate(cfg, workdir, held)


def _train_and_evaluate(cfg: Config, workdir: str | Path, held: contextlib.ExitStack) -> dict:
  validate(cfg)
  workdir = Path(workdir)
  check_workdir(workdir)
  if cfg.train.tensorboard and tensorboard_available():
    raise HetlmError(tensorboard_available())
  if (workdir / "config.json").exists():
    _check_resumable(Config.load(workdir / "config.json"), cfg, workdir)
  tokenizer = PageTokenizer.load(workdir / "tokenizer.json") if (workdir / "tokenizer.json").exists() else None
  prepared = prepare_data(cfg, tokenizer)
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  hosts.check_same(f"{data_path(cfg)}: the data read (users, tokens, pages)", seqs.tokens, seqs.offsets, seqs.split,
                   np.array([tokenizer.vocab_size]))
  c = cfg.cluster
  ks = [c.k] if c.k else c.candidates()
  if max(ks) > seqs.num_users:
    raise HetlmError(f"--k={max(ks)} is more than the {seqs.num_users} usable users in {data_path(cfg)}")
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size,
                                              output_bias=c.cluster_params != "all", lora_rank=c.lora_rank()))
  for k in ks:  # checks the mesh against the flags before anything is written
    make_mesh(cfg, k)
  sliced = validation_slice(cfg, prepared)
  if sliced[1] is None:
    if not c.k:
      raise HetlmError(f"{data_path(cfg)}: --val_frac={cfg.train.val_frac} draws no validation user among "
                       f"{seqs.num_users:,} users, and --k=auto chooses K on them: raise --val_frac")
    if c.tune_baselines:
      raise HetlmError(f"{data_path(cfg)}: --val_frac={cfg.train.val_frac} draws no validation user among "
                       f"{seqs.num_users:,} users, and --tune_baselines chooses on them: raise --val_frac")
    if cfg.train.patience:
      logging.warning("--val_frac=%s draws no validation user among %s users: early stopping is off, and every "
                      "round trains --epochs=%d passes", cfg.train.val_frac, f"{seqs.num_users:,}", cfg.train.epochs)

  hold(held, workdir, "train")  # before anything is written; a second run on this workdir is refused here
  if hosts.is_primary():  # in a multi-process job, process 0 writes the run's files; orbax saves collectively
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(workdir / "tokenizer.json")
    write_sessions(workdir, seqs, tokenizer)
    cfg.save(workdir / "config.json")
  hosts.barrier("workdir ready")
  log = MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard" if cfg.train.tensorboard else None)
  hosts.barrier("metrics read")  # every process starts from the same records
  n_shared, n_own = part_sizes(cfg.model, c.cluster_params)
  n_params = n_shared + n_own
  events = prepared.stats.get("events", 0)
  logging.info("data: %s users (%s dropped as too short), %s events, vocab %d, prepared in %.1fs (%.0f events/s)",
               f"{seqs.num_users:,}", f"{prepared.stats.get('users_dropped_too_short', 0):,}", f"{events:,}",
               tokenizer.vocab_size, prepared.seconds, events / max(prepared.seconds, 1e-9))
  trained = sliced[0]  # the users whose histories train (validation users taken out where they come from them)
  log.write({"kind": "start", "users": seqs.num_users, "vocab_size": tokenizer.vocab_size, "params": n_params,
             "k": c.k or "auto", "data": prepared.stats, "prepare_s": prepared.seconds,
             "train_users": trained.num_users, "train_tokens": int((trained.split - trained.offsets[:-1]).sum())})

  seqs, validation, evaluated_U = sliced
  # Every model trains on the same tokens; with --route_frac, each history's tail is kept out to route users.
  train_seqs = routing_split(seqs, c.route_frac) if c.route_frac else seqs
  assignments_path = workdir / "assignments.parquet"
  on_round = lambda assignment: write_assignments(assignments_path, seqs, assignment, prepared.int_user_ids)
  k_curve = None
  tuning = {}
  if c.k == 0:
    hetlm, k_curve = _choose_k(cfg, train_seqs, tokenizer.vocab_size, workdir, log, validation)
    on_round(hetlm.assignment)
  elif c.tune_baselines:  # HeTLM's --prox from a grid, by the validation users; the chosen one is "hetlm"
    runs = {name: train_hetlm(candidate, c.k, train_seqs, tokenizer.vocab_size, workdir, log, validation, name=name)
            for name, candidate in tuning_grids.prox_candidates(cfg).items()}
    hetlm, tuning["hetlm"] = tuning_grids.choose("hetlm", runs, validation, log, workdir)
    cfg = cfg.replace(cluster=dataclasses.replace(c, prox=hetlm.cfg.cluster.prox))  # single_ft uses the same
    on_round(hetlm.assignment)
  else:
    hetlm = train_hetlm(cfg, c.k, train_seqs, tokenizer.vocab_size, workdir, log, validation, on_round=on_round)
  k = hetlm.trainer.k
  models = {"hetlm": hetlm}
  init_stops = [r for r in log.records("stop") if r["model"] == "init_single"]  # one per round
  total = n_shared + k * n_own if k > 1 else n_params
  anchored = n_params if hetlm.trainer.mix is not None else 0  # --mix_init: the init LM predicts beside them
  total += anchored
  params = {"hetlm": total}
  parts = {"cluster_params": c.cluster_params, "shared": n_shared if k > 1 else 0,
           "per_cluster": n_own if k > 1 else n_params, "init_lm": anchored}
  if c.baselines and k > 1:
    single_model = dataclasses.replace(cfg.model, lora_rank=0)  # adapters are a cluster's own: a single LM has none
    matched_model = matched_config(single_model, total)
    logging.info("parameters: HeTLM %s (shared %s + K=%d × %s own%s) · single %s · single_matched %s (d_model %d, "
                 "%d layers)", f"{total:,}", f"{n_shared:,}", k, f"{n_own:,}",
                 f" + the init LM's {anchored:,}" if anchored else "", f"{param_count(single_model):,}",
                 f"{param_count(matched_model):,}", matched_model.d_model, matched_model.n_layers)
    zeros = lambda: np.zeros(seqs.num_users, np.int32)
    # Same code path with K=1 and the same rules as the LM HeTLM starts from (rounds from scratch, then an
    # anneal): `single` is that LM (its checkpoints are copied when it was trained with the same config).
    for name, model_cfg in (("single", single_model), ("single_matched", matched_model)):
      source = "init_single" if name == "single" and warmed(cfg, k) else None
      candidates = {name: cfg.replace(model=model_cfg)}
      if name == "single_matched" and c.tune_baselines:
        candidates = tuning_grids.matched_candidates(candidates[name])
      runs = {n: train_family(n, candidate, 1, train_seqs, workdir, log, zeros, c.init_rounds, validation,
                              continue_from=source) for n, candidate in candidates.items()}
      if name in runs:
        models[name] = runs[name]
      else:  # single_matched's learning rate and dropout, by the validation users
        models[name], tuning[name] = tuning_grids.choose(name, runs, validation, log, workdir)
      params[name] = param_count(model_cfg)
    if warmed(cfg, k):  # the K=1 control, fine-tuned from the same LM exactly as HeTLM's clusters are
      models["single_ft"] = train_single_ft(cfg, train_seqs, workdir, log, validation, hetlm.rounds)
      params["single_ft"] = param_count(cfg.model) * (2 if models["single_ft"].trainer.mix is not None else 1)

  passes = {name: round(m.passes, 2) for name, m in models.items()}
  tokens = {name: int(m.tokens) for name, m in models.items()}
  if init_stops and warmed(cfg, k):
    passes["init_single"] = round(sum(r["passes"] for r in init_stops), 2)
    tokens["init_single"] = int(sum(r.get("tokens", 0) for r in init_stops))
  extra = {"k": k, "rounds": hetlm.rounds, "params": params, "hetlm_params": parts, "data": data_path(cfg),
           "train_s": {name: m.train_s for name, m in models.items()}, "passes": passes, "tokens_trained": tokens,
           "hetlm_is_init_lm": _kept_its_init_lm(log, hetlm.name, warmed(cfg, k)),
           "early_stopping": {"patience": cfg.train.patience if validation else 0,
                              "max_passes_per_round": cfg.train.epochs,
                              "warm_passes_per_round": cfg.train.warm_epochs, "val_every": cfg.train.val_every,
                              "warm_lr_scale": c.warm_lr_scale, "prox": c.prox, "route_frac": c.route_frac,
                              "interpolate": c.interpolate, "mix_init": c.mix_init,
                              "validation_users": 0 if validation is None else validation.seqs.num_users}}
  if tuning:
    extra["tuning"] = tuning
  if validation is not None:  # the statistic every decision read, per model: per-user mean and its variance
    extra["validation"] = {name: dict(zip(("mean", "var"), validation.stats(m.trainer, m.params, m.assignment,
                                                                              m.weights)))
                           for name, m in models.items()}
  if k_curve is not None:
    extra["k_sweep"] = {"selection_nll": {str(key): v for key, v in k_curve.items()},
                        "note": "K chosen on the validation users' held-out targets; they are left out of n_users"}
  families = {name: LMFamily(name, m.trainer, m.params, m.assignment,
                             cluster_shares(m.assignment, m.weights, m.trainer.k), m.history_nll)
              for name, m in models.items()}
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
  log.close()
  return report


@dataclasses.dataclass
class TrainedRun:
  config: Config
  tokenizer: PageTokenizer
  params: object  # stacked: leading K axis
  assignment: np.ndarray  # cluster of each user, in the order of the training data's users
  step: int
  weights: np.ndarray | None = None  # [U, K] soft-EM responsibilities (--soft), else None
  trainer: Trainer | None = None  # the compiled scoring and decoding of these K models, on the devices loaded onto


def load_run_name(workdir: Path, model: str) -> str:
  """The checkpoint folder of a model family: with --k=auto, "hetlm" is the chosen hetlm_kK; with
  --tune_baselines, "hetlm" and "single_matched" are the candidates chosen (tuned.json)."""
  if model == "hetlm" and (workdir / "k_auto.json").exists():
    return f"hetlm_k{json.loads((workdir / 'k_auto.json').read_text())['k']}"
  return tuning_grids.tuned_name(workdir, model)


def load_run(workdir: str | Path, model: str = "hetlm", step: int | None = None, devices=None) -> TrainedRun:
  """Loads a trained model family from its workdir alone (config.json, tokenizer.json, the latest checkpoint or
  `step`), onto `devices` (default: every device; the mesh's batch and cluster axes are fitted to them)."""
  workdir = Path(workdir)
  for name in ("config.json", "tokenizer.json"):
    if not (workdir / name).exists():
      raise HetlmError(f"{workdir}: no {name}; is this a hetlm workdir?")
  cfg = Config.load(workdir / "config.json")
  tokenizer = PageTokenizer.load(workdir / "tokenizer.json")
  model = load_run_name(workdir, model)
  if not (workdir / "checkpoints" / model).is_dir():
    raise HetlmError(f"{workdir}: no checkpoint of {model} yet")
  ckpts = Checkpoints(workdir / "checkpoints" / model, cfg.train.keep_checkpoints)
  try:
    steps = ckpts.all_steps()
    if not steps or (step is not None and step not in steps):
      raise HetlmError(f"{workdir}: no checkpoint of {model} " + ("yet" if step is None else f"at step {step}"))
    meta = ckpts.meta(step)  # each model family records its own K and model config
    cfg = cfg.replace(model=ModelConfig(**meta["model"]))
    if devices is not None:
      cfg = fitted_to(cfg, len(devices))
    trainer = Trainer(cfg, int(meta["k"]), devices)
    state, _, assignment, meta, weights = ckpts.restore(trainer.abstract, int(meta["num_users"]), step)
    if "mix" in meta:  # --mix_init: the LM it mixes with was saved beside it
      trainer.set_mix(ckpts.restore_anchor(trainer.anchor_shape(), step), meta["mix"])
  finally:
    ckpts.close()
  return TrainedRun(cfg, tokenizer, state.params, assignment, int(meta["step"]), weights, trainer)


def fitted_to(cfg: Config, n_devices: int) -> Config:
  """The run's config on `n_devices` devices that need not be the training's: every device on the batch
  axis, the batch rounded up to fill them (only loading and scoring use it)."""
  batch = -(-cfg.train.batch_size // n_devices) * n_devices
  return cfg.replace(train=dataclasses.replace(cfg.train, batch_size=batch),
                     cluster=dataclasses.replace(cfg.cluster, cluster_axis=1))


def _families_for(workdir: Path, seqs: UserSequences,
                  names=("hetlm", "single", "single_ft", "single_matched")) -> dict[str, LMFamily]:
  """Every trained model family of `names` in `workdir`, with each user of `seqs` routed to one of its models:
  by the saved assignment when the user was trained on, else by the perplexity of their history."""
  families = {}
  for name in names:
    try:
      run = load_run(workdir, name)
    except HetlmError:
      continue
    k = num_models(run.params)
    family = LMFamily(name, run.trainer, run.params, np.zeros(seqs.num_users, np.int32),
                      cluster_shares(run.assignment, run.weights, k))
    if k > 1:
      family.assignment = _saved_or_routed(workdir, family, seqs)
    families[name] = family
  if not families:
    raise HetlmError(f"{workdir}: no trained model under checkpoints/; run `hetlm train` first")
  return families


class SavedAssignment:
  """assignments.parquet of a workdir: the cluster each training user ended in (none when the file is absent)."""

  def __init__(self, workdir: Path):
    path = workdir / "assignments.parquet"
    saved = pq.read_table(path) if path.exists() else pa.table({"user_id": pa.array([], pa.string()),
                                                                "cluster": pa.array([], pa.int32())})
    self._ids, self._cluster = pc.cast(saved["user_id"], pa.string()), saved["cluster"].to_numpy()

  def lookup(self, user_ids: np.ndarray) -> np.ndarray:
    """[U] each user's saved cluster, -1 for a user the models never trained on."""
    found_U = pc.fill_null(pc.index_in(pa.array(np.asarray(user_ids).astype(str)), value_set=self._ids),
                           -1).to_numpy()
    return np.where(found_U >= 0, self._cluster[np.maximum(found_U, 0)] if len(self._cluster) else -1,
                    -1).astype(np.int32)


def _saved_or_routed(workdir: Path, family: LMFamily, seqs: UserSequences) -> np.ndarray:
  assignment_U = SavedAssignment(workdir).lookup(seqs.user_ids)
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


# What eval.json says about the training (not the evaluation); `hetlm evaluate` carries it over.
PROVENANCE = ("k", "rounds", "params", "hetlm_params", "train_s", "passes", "tokens_trained", "early_stopping",
              "hetlm_is_init_lm", "k_sweep", "validation", "tuning")


def _training_provenance(workdir: Path) -> dict:
  try:
    previous = json.loads((workdir / "eval.json").read_text())
  except (OSError, ValueError):
    return {}
  return {key: previous[key] for key in PROVENANCE if key in previous}


def evaluate_workdir(workdir: str | Path, data: str | None = None) -> dict:
  """`hetlm evaluate`: re-evaluates every trained model in `workdir` on its data (the validation users left
  out, as `train` does), or on every user of `data`."""
  workdir = Path(workdir)
  with interrupt.stop_handler(), contextlib.ExitStack() as held:
    cfg, prepared = _workdir_data(workdir, data)
    hold(held, workdir, "evaluate")  # it rewrites eval.json and report.md
    return _evaluate_workdir(workdir, data, cfg, prepared)


def _evaluate_workdir(workdir: Path, data: str | None, cfg: Config, prepared: Prepared) -> dict:
  seqs, _, evaluated_U = validation_slice(cfg, prepared) if data is None else (prepared.seqs, None, None)
  families = _families_for(workdir, seqs)
  log = MetricsLog(workdir / "metrics.jsonl")
  hetlm_name = load_run_name(workdir, "hetlm")
  rounds = [r for r in log.records("round") if r["model"] == hetlm_name]
  extra = {**_training_provenance(workdir), "data": data_path(cfg)}
  if prepared.test_seqs is not None:
    return evaluate_new_users(families, seqs, prepared.test_seqs, prepared.tokenizer, workdir,
                              extra=extra, rounds=rounds)
  return evaluate(families, seqs, prepared.tokenizer, workdir, evaluated_U, rounds=rounds, extra=extra)


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
  family = _families_for(workdir, one, names=("hetlm",))["hetlm"]
  interrupt.safe_point("before generating", "generate writes nothing")
  length = session_length_from_data(seqs, tokenizer.num_specials)  # when the model never saw a session end
  if length is not None:
    sampling = dataclasses.replace(sampling, max_new=min(sampling.max_new, length))
  generated = generate(family.trainer.cfg.model, family.params, one, family.assignment, np.array([0]), sampling,
                       seed=cfg.train.seed, mix=family.trainer.mix)[0]
  actual = one.target(0)
  actual = actual[(actual != BOS) & (actual != EOS)]  # the next session's pages: `generated` has no <s> or </s>
  return {"user": str(user), "cluster": int(family.assignment[0]), "history": tokenizer.decode(one.history(0)),
          "generated": tokenizer.decode(generated), "actual": tokenizer.decode(actual)}
