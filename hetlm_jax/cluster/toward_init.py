"""A warm-started family may not fall below the LM it started from by what validation can see: once its rounds
end, its models are pulled back toward that LM (the anchor, `Trainer.anchor`) as far as the validation users ask.
--interpolate mixes the parameters, alpha_k theta_k + (1 - alpha_k) theta_init; --mix_init mixes the predictions,
lam_k p_k + (1 - lam_k) p_init. A weight of 0 is the init LM, 1 the trained cluster model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hetlm_jax.cluster.validation import Validation
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.train.split import partition
from hetlm_jax.train.state import cluster_spec

INTERPOLATION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate_params(params, anchor: dict, alpha_K: np.ndarray, alpha_shared: float, spec: str, n_layers: int):
  """Model k's parameters alpha_k theta_k + (1 - alpha_k) theta_init (`anchor`: the init LM, one model), the
  shared part with `alpha_shared`: alpha 0 is the init LM, 1 the trained cluster model."""
  split = partition(spec, n_layers, anchor)
  alpha_K = jnp.asarray(alpha_K, jnp.float32)
  mix_K = lambda x_K, a: (
    alpha_K.reshape((-1,) + (1,) * (x_K.ndim - 1)) * x_K + (1 - alpha_K.reshape((-1,) + (1,) * (x_K.ndim - 1))) * a
  )
  return {
    "shared": jax.tree.map(lambda x, a: alpha_shared * x + (1 - alpha_shared) * a, params["shared"], split["shared"]),
    "cluster": jax.tree.map(mix_K, params["cluster"], split["cluster"]),
  }


def fit_weights(k: int, validation: Validation, assignment_U: np.ndarray, per_user, rescore_own: bool):
  """Weights in [0, 1] toward a family's trained models (1) or the LM they started from (0), from
  INTERPOLATION_GRID by the validation users' per-user mean NLL, `per_user(w_K, w_shared)` scoring them: first
  one weight for every model (and the shared part), then, split in time, each cluster's own on its own
  validation users (`rescore_own`: those scorings run again at the common shared weight). 0 for all is the
  LM started from, so the result is at least as good as it on validation. Returns (w_K, w_shared, scores
  {w: per-user NLL with every weight w}, per-user NLL with the weights returned)."""

  def lowest(by_w, users=slice(None)):  # ties (within float noise) go to the smaller weight, toward the init LM
    means = {a: np.nanmean(by_w[a][users]) for a in INTERPOLATION_GRID}
    return min(a for a in INTERPOLATION_GRID if means[a] <= min(means.values()) + 1e-7)

  scores = {a: per_user(np.full(k, a), a) for a in INTERPOLATION_GRID}
  common = lowest(scores)
  w_K = np.full(k, common)
  if validation.users is not None and k > 1:  # each cluster's users are scored by its own model alone
    cluster_R = assignment_U[validation.users]
    by_w = {
      a: per_user(np.full(k, a), common) if rescore_own and a != common else scores[a] for a in INTERPOLATION_GRID
    }
    for c in range(k):
      mine = cluster_R == c
      if mine.any():
        w_K[c] = lowest(by_w, mine)
  return w_K, common, scores, per_user(w_K, common)


def _weights_record(kind: str, name: str, scores: dict, final: np.ndarray, **weights) -> dict:
  """The metrics.jsonl record of fitted weights: them, and the validation statistic with them, with the trained
  models alone and with the init LM alone."""
  return {
    "kind": kind,
    "model": name,
    **weights,
    "validation_nll": float(np.nanmean(final)),
    "validation_var": float(np.nanvar(final)),
    "validation_trained": float(np.nanmean(scores[1.0])),
    "validation_init": float(np.nanmean(scores[0.0])),
  }


def interpolate(
  name: str, trainer: Trainer, params, validation: Validation, assignment_U, weights_UxK, log: MetricsLog
) -> tuple[object, dict]:
  """--interpolate: every cluster model becomes alpha_k theta_k + (1 - alpha_k) theta_init, alpha by
  _fit_weights (the shared part takes the common alpha)."""
  k, spec, n_layers = trainer.k, cluster_spec(trainer.cfg, trainer.k), trainer.cfg.model.n_layers
  mixed = jax.jit(
    functools.partial(interpolate_params, spec=spec, n_layers=n_layers),
    out_shardings=jax.tree.map(lambda x: x.sharding, trainer.abstract.params),
  )
  per_user = lambda alpha_K, alpha_shared: validation.per_user(
    trainer, mixed(params, trainer.anchor, np.asarray(alpha_K, np.float32), alpha_shared), assignment_U, weights_UxK
  )
  # With no shared part (--cluster_params=all) the shared alpha changes nothing: no scoring runs again.
  alpha_K, common, scores, final = fit_weights(
    k, validation, assignment_U, per_user, rescore_own=bool(jax.tree.leaves(params["shared"]))
  )
  record = _weights_record("interpolate", name, scores, final, alpha=alpha_K.tolist(), alpha_shared=common)
  log.write(record)
  logging.info(
    "%s: interpolated toward its init LM, alpha %s (shared %.2f): validation per-user NLL %.4f "
    "(trained %.4f, init LM %.4f)",
    name,
    alpha_K.tolist(),
    common,
    record["validation_nll"],
    record["validation_trained"],
    record["validation_init"],
  )
  return mixed(params, trainer.anchor, alpha_K.astype(np.float32), common), record


def fit_mix(
  name: str, trainer: Trainer, params, validation: Validation, assignment_U, weights_UxK, log: MetricsLog
) -> list[float]:
  """--mix_init: model k predicts lam_k p_k + (1 - lam_k) p_init (p_init: `trainer.anchor`), lam by
  _fit_weights; the trainer keeps the mixture (Trainer.set_mix). Returns lam."""

  def per_user(lam_K, _):
    trainer.set_mix(trainer.anchor, lam_K)
    return validation.per_user(trainer, params, assignment_U, weights_UxK)

  lam_K, _, scores, final = fit_weights(trainer.k, validation, assignment_U, per_user, rescore_own=False)
  record = _weights_record("mix", name, scores, final, lam=lam_K.tolist())
  log.write(record)
  logging.info(
    "%s: mixed with its init LM in prediction space, lam %s: validation per-user NLL %.4f (trained %.4f, init LM %.4f)",
    name,
    lam_K.tolist(),
    record["validation_nll"],
    record["validation_trained"],
    record["validation_init"],
  )
  return record
