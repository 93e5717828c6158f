"""train_and_evaluate(config, workdir): the whole job, callable without a command line."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from absl import logging

from hetlm_jax.config import Config, validate
from hetlm_jax.data import SAMPLE_PATH
from hetlm_jax.data.readers import read_events
from hetlm_jax.data.sequences import UserSequences, build_sequences, outcome_types
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.errors import HetlmError
from hetlm_jax.model import param_count
from hetlm_jax.train.batches import ClusterBatches
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog

# Settings that may differ when the same run is resumed; everything else must match the saved config.
_RESUMABLE_CHANGES = {("train", "log_every"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
                      ("train", "eval_batch_size")}


@dataclasses.dataclass
class Prepared:
  seqs: UserSequences
  tokenizer: PageTokenizer
  stats: dict
  seconds: float


def data_path(cfg: Config) -> str:
  return cfg.data.path or str(SAMPLE_PATH)


def prepare_data(cfg: Config, tokenizer: PageTokenizer | None = None) -> Prepared:
  """Reads the log and builds per-user sequences; fits the tokenizer unless one is given."""
  d = cfg.data
  path = data_path(cfg)
  start = time.perf_counter()
  table = read_events(path, d.format, max_users=d.max_users or None)
  if tokenizer is None:
    tokenizer = PageTokenizer.fit(table["page"], outcome_types(table), min_count=d.min_count,
                                  max_vocab=d.max_vocab or None)
  seqs, stats = build_sequences(table, tokenizer, session_gap_s=d.session_gap_minutes * 60, holdout=d.holdout)
  if seqs.num_users == 0:
    raise HetlmError(f"{path}: no user has enough events to hold one out (all {stats.get('users_in', 0)} too short)")
  return Prepared(seqs, tokenizer, stats, time.perf_counter() - start)


def _check_resumable(saved: Config, cfg: Config, workdir: Path) -> None:
  a, b = saved.to_dict(), cfg.to_dict()
  diffs = [f"--{key}" for section in a for key in a[section]
           if a[section][key] != b[section][key] and (section, key) not in _RESUMABLE_CHANGES
           and not (section, key) == ("model", "vocab_size")]
  if diffs:
    raise HetlmError(f"{workdir}: holds a run with different settings ({', '.join(diffs)}); "
                     "pass the same flags to resume it, or use a new --workdir")


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
  """Trains (or resumes) the run in `workdir` and returns its summary; validates everything first."""
  validate(cfg)
  workdir = Path(workdir)
  saved_cfg = None
  if (workdir / "config.json").exists():
    saved_cfg = Config.load(workdir / "config.json")
    _check_resumable(saved_cfg, cfg, workdir)
  tokenizer = PageTokenizer.load(workdir / "tokenizer.json") if (workdir / "tokenizer.json").exists() else None
  prepared = prepare_data(cfg, tokenizer)
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  k = cfg.cluster.k
  if k > seqs.num_users:
    raise HetlmError(f"--k={k} is more than the {seqs.num_users} usable users in {data_path(cfg)}")
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
  trainer = Trainer(cfg, k)  # checks the mesh against the flags before anything is written

  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer.save(workdir / "tokenizer.json")
  cfg.save(workdir / "config.json")
  log = MetricsLog(workdir / "metrics.jsonl")
  n_params = param_count(cfg.model)
  events = prepared.stats.get("events", 0)
  logging.info("data: %s users (%s dropped as too short), %s events, vocab %d, prepared in %.1fs (%.0f events/s)",
               f"{seqs.num_users:,}", f"{prepared.stats.get('users_dropped_too_short', 0):,}", f"{events:,}",
               tokenizer.vocab_size, prepared.seconds, events / max(prepared.seconds, 1e-9))
  logging.info("model: %s parameters per cluster model, K=%d, %d devices (mesh %s)", f"{n_params:,}", k,
               trainer.mesh.size, dict(trainer.mesh.shape))
  log.write({"kind": "start", "users": seqs.num_users, "vocab_size": tokenizer.vocab_size, "params": n_params,
             "k": k, "devices": trainer.mesh.size, "data": prepared.stats, "prepare_s": prepared.seconds})

  ckpts = Checkpoints(workdir, cfg.train.keep_checkpoints)
  assignment = np.zeros(seqs.num_users, np.int32)
  if ckpts.latest_step() is not None:
    state, assignment, meta = ckpts.restore(trainer.abstract, seqs.num_users)
    round_index, round_complete = int(meta["round"]), bool(meta["round_complete"])
    logging.info("resuming from step %d (round %d)", int(state.step), round_index)
  else:
    state, round_index, round_complete = trainer.init_state(), 0, False

  def save(state, round_index, complete):
    ckpts.save(state, assignment, {"step": int(state.step), "round": round_index, "round_complete": complete,
                                   "num_users": seqs.num_users})

  def periodic_save(state):
    if int(state.step) % cfg.train.checkpoint_every == 0:
      save(state, round_index, False)

  start = time.perf_counter()
  if not round_complete:
    batches = ClusterBatches(seqs, assignment, k, cfg.train.batch_size, cfg.model.context, cfg.train.epochs,
                             cfg.train.seed, round_index)
    if int(state.step) == 0 or round_complete:
      state = trainer.start_round(state, batches.steps)
    state = trainer.train_round(state, batches, log, on_step=periodic_save)
    save(state, round_index, True)
  train_s = time.perf_counter() - start

  nll_KxU, tokens_U = trainer.score(state.params, seqs, "target", label="eval")
  nll_U = nll_KxU[assignment, np.arange(seqs.num_users)] / np.maximum(tokens_U, 1)
  summary = {"kind": "eval", "users": seqs.num_users, "target_nll_mean": float(nll_U.mean()),
             "target_nll_token_weighted": float(nll_KxU[assignment, np.arange(seqs.num_users)].sum() / tokens_U.sum()),
             "target_nll_std": float(nll_U.std()), "train_s": train_s, "step": int(state.step)}
  log.write(summary)
  logging.info("held-out target NLL %.4f nats/token (per-user mean %.4f, std %.4f)",
               summary["target_nll_token_weighted"], summary["target_nll_mean"], summary["target_nll_std"])
  ckpts.close()
  return summary


@dataclasses.dataclass
class TrainedRun:
  config: Config
  tokenizer: PageTokenizer
  params: object  # stacked: leading K axis
  assignment: np.ndarray  # cluster of each user, in the order of the training data's users
  step: int


def load_run(workdir: str | Path) -> TrainedRun:
  """Loads a trained run from its workdir alone (config.json, tokenizer.json, latest checkpoint)."""
  workdir = Path(workdir)
  for name in ("config.json", "tokenizer.json"):
    if not (workdir / name).exists():
      raise HetlmError(f"{workdir}: no {name}; is this a hetlm workdir?")
  cfg = Config.load(workdir / "config.json")
  tokenizer = PageTokenizer.load(workdir / "tokenizer.json")
  ckpts = Checkpoints(workdir, cfg.train.keep_checkpoints)
  if ckpts.latest_step() is None:
    raise HetlmError(f"{workdir}: no checkpoint yet")
  trainer = Trainer(cfg, cfg.cluster.k)
  num_users = int(ckpts.meta()["num_users"])
  state, assignment, meta = ckpts.restore(trainer.abstract, num_users)
  ckpts.close()
  return TrainedRun(cfg, tokenizer, state.params, assignment, int(meta["step"]))
