"""hetlm bench: throughput of the stacked step (K=1, K=8), of a per-cluster loop, and of the scoring pass."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging

from hetlm_jax.cluster.assign import random_balanced
from hetlm_jax.config import Config, validate
from hetlm_jax.model import param_count
from hetlm_jax.pipeline import prepare_data
from hetlm_jax.train.batches import ClusterBatches
from hetlm_jax.train.loop import Trainer


def _time_steps(step_fn, state, batches: ClusterBatches, steps: int):
  """Seconds per step after one compiling warm-up step, and the real (unpadded) tokens per step."""
  inputs, segments, _ = batches.batch(0)
  state, metrics = step_fn(state, inputs, segments)
  jax.block_until_ready(metrics)
  tokens = 0
  start = time.perf_counter()
  for s in range(steps):
    inputs, segments, _ = batches.batch((s + 1) % batches.steps)
    tokens += int(((segments[..., 1:] == segments[..., :-1]) & (segments[..., 1:] != 0)).sum())
    state, metrics = step_fn(state, inputs, segments)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, tokens / steps


def _stacked(cfg: Config, seqs, k: int, steps: int) -> dict:
  trainer = Trainer(cfg, k)
  batches = ClusterBatches(seqs, random_balanced(seqs.num_users, k, 0), k, cfg.train.batch_size,
                           cfg.model.context, 1_000, 0, 0)
  state = trainer.start_round(trainer.init_state(), batches.steps)
  seconds, tokens = _time_steps(trainer.train_step, state, batches, steps)
  # 6 × params per trained token: the usual estimate of a step's matmul work, attention left out.
  return {"k": k, "step_s": seconds, "tokens_per_s": tokens / seconds,
          "flops_per_s": 6 * param_count(cfg.model) * tokens / seconds}


def _per_cluster_loop(cfg: Config, seqs, k: int, steps: int) -> dict:
  """The same K models trained by a Python loop of K single-model steps (what stacking replaces)."""
  trainer = Trainer(cfg, 1)
  batches = ClusterBatches(seqs, random_balanced(seqs.num_users, k, 0), k, cfg.train.batch_size,
                           cfg.model.context, 1_000, 0, 0)
  states = [trainer.start_round(trainer.init_state(), batches.steps) for _ in range(k)]

  def loop_step(states, inputs, segments):
    out = [trainer.train_step(states[c], inputs[c:c + 1], segments[c:c + 1]) for c in range(k)]
    return [s for s, _ in out], [m for _, m in out]

  seconds, tokens = _time_steps(loop_step, states, batches, steps)
  return {"k": k, "step_s": seconds, "tokens_per_s": tokens / seconds}


def _scoring(cfg: Config, seqs, k: int) -> dict:
  trainer = Trainer(cfg, k)
  params = trainer.init_state().params
  trainer.score(params, seqs.subset(np.arange(min(seqs.num_users, 64))), "history")  # compile
  start = time.perf_counter()
  trainer.score(params, seqs, "history")
  seconds = time.perf_counter() - start
  return {"k": k, "users": seqs.num_users, "seconds": seconds, "users_per_s": seqs.num_users / seconds,
          "user_model_pairs_per_s": k * seqs.num_users / seconds}


def run_bench(cfg: Config, out: str | None, steps: int = 20, ks: tuple[int, ...] = (1, 8)) -> dict:
  """Measures on the configured data (default: the packaged sample); writes JSON to `out` if given."""
  validate(cfg)
  prepared = prepare_data(cfg)
  seqs = prepared.seqs
  cfg = cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=prepared.tokenizer.vocab_size))
  device = jax.devices()[0]
  result = {
    "date": time.strftime("%Y-%m-%d"), "device": f"{device.platform}: {device.device_kind}",
    "devices": jax.device_count(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
    "jax": jax.__version__, "params_per_model": param_count(cfg.model), "users": seqs.num_users,
    "model": dataclasses.asdict(cfg.model), "batch_size_per_cluster": cfg.train.batch_size,
    "prepare_events_per_s": prepared.stats["events"] / max(prepared.seconds, 1e-9),
    "stacked": [], "per_cluster_loop": [], "scoring": [],
  }
  for k in ks:
    logging.info("bench: stacked step, K=%d", k)
    result["stacked"].append(_stacked(cfg, seqs, k, steps))
    if k > 1:
      logging.info("bench: per-cluster loop, K=%d", k)
      result["per_cluster_loop"].append(_per_cluster_loop(cfg, seqs, k, steps))
    logging.info("bench: scoring, K=%d", k)
    result["scoring"].append(_scoring(cfg, seqs, k))
  for row in result["stacked"]:
    logging.info("stacked K=%d: %.1f ms/step, %s tokens/s", row["k"], 1e3 * row["step_s"], f"{row['tokens_per_s']:,.0f}")
  for row in result["per_cluster_loop"]:
    logging.info("loop of K=%d single steps: %.1f ms/step, %s tokens/s", row["k"], 1e3 * row["step_s"],
                 f"{row['tokens_per_s']:,.0f}")
  for row in result["scoring"]:
    logging.info("scoring K=%d: %s users/s", row["k"], f"{row['users_per_s']:,.0f}")
  if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
  return result
