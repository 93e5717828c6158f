"""--tune_baselines: small grids for both sides, chosen on the validation users alone, so that neither HeTLM nor
the parameter-matched single LM is tuned while the other is not. HeTLM tries PROX_GRID (its single LMs are
trained once and shared); single_matched tries MATCHED_GRID's learning rates and dropouts. Each candidate
is a model family of its own in WORKDIR/checkpoints/NAME; WORKDIR/tuned.json says which one each name is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import logging

from hetlm_jax.cluster.rounds import Trained
from hetlm_jax.cluster.validation import Validation
from hetlm_jax.config import Config
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.workdir import record_tuned

PROX_GRID = (0.0, 1.0, 3.0)
MATCHED_LR_SCALES = (1 / 3, 1.0)  # times --learning_rate
MATCHED_DROPOUTS = (0.0, 0.1)  # added to --dropout


def prox_candidates(cfg: Config) -> dict[str, Config]:
  """HeTLM's candidates: {family name: config}."""
  return {f"hetlm_prox{p:g}": cfg.replace(cluster=dataclasses.replace(cfg.cluster, prox=p)) for p in PROX_GRID}


def matched_candidates(cfg: Config) -> dict[str, Config]:
  """single_matched's candidates (`cfg` already holds its model size): {family name: config}."""
  out = {}
  for scale in MATCHED_LR_SCALES:
    for extra in MATCHED_DROPOUTS:
      lr, dropout = cfg.train.learning_rate * scale, round(cfg.model.dropout + extra, 4)
      out[f"single_matched_lr{lr:g}_do{dropout:g}"] = cfg.replace(
        train=dataclasses.replace(cfg.train, learning_rate=lr), model=dataclasses.replace(cfg.model, dropout=dropout)
      )
  return out


def choose(
  name: str, runs: dict[str, Trained], validation: Validation, log: MetricsLog, workdir: Path
) -> tuple[Trained, dict]:
  """The candidate with the lowest per-user mean validation NLL; records the choice in tuned.json."""
  scores = {n: validation.nll(r.trainer, r.params, r.assignment, r.weights) for n, r in runs.items()}
  best = min(scores, key=scores.get)
  log.write({"kind": "tuned", "model": name, "chosen": best, "validation_nll": scores})
  logging.info(
    "%s: chose %s by the validation users (%s)", name, best, ", ".join(f"{n} {v:.4f}" for n, v in scores.items())
  )
  record_tuned(workdir, name, best)
  return runs[best], {"chosen": best, "validation_nll": scores}
