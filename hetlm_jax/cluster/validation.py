"""The validation users: the held-out targets that every decision of a run reads (when a round stops, K, the
interpolation weights, the tuned settings), never the test users'."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
from scipy.special import logsumexp

from hetlm_jax import hosts
from hetlm_jax.cluster.assign import cluster_shares, log_shares
from hetlm_jax.config import Config
from hetlm_jax.data.ownership import user_uniform
from hetlm_jax.data.prepare import Prepared
from hetlm_jax.data.sequences import UserSequences, held_out_users
from hetlm_jax.train.loop import Trainer


@dataclasses.dataclass
class Validation:
  """Held-out targets of a slice of the training users, which decide when a round stops training.

  Split in time, `users` are their indices among the training users: they train on their histories, their
  targets are scored by their own cluster's model, and the evaluation leaves them out. Split by user,
  `users` is None: they never train, and their whole sequences are scored by the mixture likelihood.
  """

  seqs: UserSequences
  users: np.ndarray | None

  def per_user(self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None) -> np.ndarray:
    """[R] each validation user's NLL per target token (nats); NaN for a user with no target token."""
    # Each group of processes scores its own share of them; only the per-user NLL passes between the groups.
    users, nll_KxR, tokens_R = trainer.score_share(params, self.seqs, "target", label="validation")
    if self.users is not None:
      nll_R = nll_KxR[assignment_U[self.users[users]], np.arange(len(users))]
    else:
      log_prior_K = log_shares(cluster_shares(assignment_U, weights_UxK, trainer.k))
      nll_R = -logsumexp(log_prior_K[:, None] - nll_KxR, axis=0)
    per_token_R = np.where(tokens_R > 0, nll_R / np.maximum(tokens_R, 1), np.nan)
    return trainer.gather_users(users, self.seqs.num_users, per_token_R)[0]

  def stats(
    self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None
  ) -> tuple[float, float]:
    """Mean and variance over the validation users of each user's NLL per target token (nats)."""
    (per_user,) = hosts.every_user(self.per_user(trainer, params, assignment_U, weights_UxK))
    per_user = per_user[~np.isnan(per_user)]
    return float(per_user.mean()), float(per_user.var())

  def nll(self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None) -> float:
    """The per-user mean NLL: the statistic every stopping and gating decision reads."""
    return self.stats(trainer, params, assignment_U, weights_UxK)[0]


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
  if cfg.data.split == "hash":  # each user's draw from its id alone
    val_U = user_uniform(pa.array(seqs.user_ids, pa.large_string()), cfg.train.seed, 7) < cfg.train.val_frac
  else:
    val_U = np.random.default_rng([cfg.train.seed, 7]).random(seqs.num_users) < cfg.train.val_frac
  drawn, users = hosts.total(np.array(val_U.sum()), np.array(len(val_U)))  # with --own_users, of every process's
  if not drawn or drawn == users:
    return seqs, None, np.ones(seqs.num_users, bool)
  if cfg.data.test_users:
    return (
      seqs.subset(~val_U),
      Validation(held_out_users(seqs, np.flatnonzero(val_U)), None),
      np.ones(int((~val_U).sum()), bool),
    )
  return seqs, Validation(seqs.subset(val_U), np.flatnonzero(val_U)), ~val_U
