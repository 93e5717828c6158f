"""The HeTLM rounds, top to bottom: initial assignment → [M-step: train the K models until the validation
NLL stops improving → E-step: move each user to the model that explains their history best (hard), or
weight every model by its posterior (soft) → re-seed degenerate clusters] until few users move.

A single LM is the same loop with K=1 and no E-step, so every model family trains by the same rule.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy.special import logsumexp

from hetlm_jax import hosts
from hetlm_jax.cluster.assign import (Reassignment, cluster_shares, kmeans, kmeans_on_features, log_shares,
                                      min_cluster_size, random_balanced, reassign)
from hetlm_jax.cluster.policy import Policy
from hetlm_jax.config import Config
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.errors import HetlmError
from hetlm_jax.train import interrupt
from hetlm_jax.train.batches import ClusterBatches
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.train.split import partition
from hetlm_jax.train.state import cluster_spec


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
  passes: float = 0.0  # passes over every user trained, over all rounds (early stopping decides how many)
  # [K, U] NLL sums of every user's history under every model of `params`, from the last E-step when it scored
  # exactly these parameters (the evaluation's mixture posterior needs the same numbers); else None.
  history_nll: np.ndarray | None = None
  tokens: float = 0.0  # real tokens trained on, over all rounds (a token repeated by --balance counts each time)


@dataclasses.dataclass
class Validation:
  """Held-out targets of a slice of the training users, which decide when a round stops training.

  Split in time, `users` are their indices among the training users: they train on their histories, their
  targets are scored by their own cluster's model, and the evaluation leaves them out. Split by user,
  `users` is None: they never train, and their whole sequences are scored by the mixture likelihood.
  """
  seqs: UserSequences
  users: np.ndarray | None

  def per_user(self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None
               ) -> np.ndarray:
    """[V] each validation user's NLL per target token (nats); NaN for a user with no target token."""
    nll_KxV, tokens_V = trainer.score(params, self.seqs, "target", label="validation")
    if self.users is not None:
      nll_V = nll_KxV[assignment_U[self.users], np.arange(self.seqs.num_users)]
    else:
      log_prior_K = log_shares(cluster_shares(assignment_U, weights_UxK, trainer.k))
      nll_V = -logsumexp(log_prior_K[:, None] - nll_KxV, axis=0)
    return np.where(tokens_V > 0, nll_V / np.maximum(tokens_V, 1), np.nan)

  def stats(self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None
            ) -> tuple[float, float]:
    """Mean and variance over the validation users of each user's NLL per target token (nats)."""
    per_user = self.per_user(trainer, params, assignment_U, weights_UxK)
    per_user = per_user[~np.isnan(per_user)]
    return float(per_user.mean()), float(per_user.var())

  def nll(self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None) -> float:
    """The per-user mean NLL: the statistic every stopping and gating decision reads."""
    return self.stats(trainer, params, assignment_U, weights_UxK)[0]


def _snapshot(state) -> dict:
  """A copy of the params and optimizer state that outlives the next (donating) train step."""
  return jax.tree.map(jnp.copy, {"params": state.params, "opt_state": state.opt_state})


def train_family(name: str, cfg: Config, k: int, seqs: UserSequences, workdir: Path, log: MetricsLog,
                 initial_assignment, rounds: int, validation: Validation | None, on_round=None,
                 warm_params=lambda: None, continue_from: str | None = None) -> Trained:
  """Trains (or resumes) one model family in WORKDIR/checkpoints/NAME for at most `rounds` rounds (plus an
  anneal), by the rules of cluster/policy.py.

  Each round is one cycle of the learning-rate schedule; at each validation the validation users' per-user
  mean NLL is measured, and after `--patience` validations without a better one the round stops and
  returns to its best point (a round never leaves the validation NLL worse than it found it). With K > 1
  the round then ends with the E-step. `initial_assignment()` is called only when there is no checkpoint to
  resume; `warm_params()` (a trained single LM, or None) when there is none, or when --prox,
  --interpolate or --mix_init needs it.

  `continue_from`: a finished family trained by the same rules with the same config, K, data and rounds
  (the single LM that warm-starts HeTLM): with no checkpoint of its own, this family is a copy of that one.
  """
  c, t = cfg.cluster, cfg.train
  interrupt.safe_point(f"before training {name}", "every model trained before it is checkpointed")
  warm = warm_params if continue_from is None else (lambda: None)
  ckpts = Checkpoints(workdir / "checkpoints" / name, t.keep_checkpoints)
  resuming = ckpts.latest_step() is not None
  source = None if resuming else _continuable(workdir, continue_from, cfg, k, rounds)
  start_params = warm() if not (resuming or source) or c.prox or c.interpolate or c.mix_init else None
  policy = Policy(cfg, k, warm=start_params is not None, validating=validation is not None)
  if resuming:  # a family that started warm says so in its checkpoint, whatever warm_params gives now
    policy = dataclasses.replace(policy, warm=bool(ckpts.meta().get("warm")))
  trainer = Trainer(cfg, k, prox=policy.prox)
  if policy.prox or policy.interpolates or policy.mixes:
    trainer.anchor = trainer.anchor_from(start_params)
  if resuming:
    state, best, assignment, meta, weights = ckpts.restore(trainer.abstract, seqs.num_users)
    if meta["done"]:
      logging.info("%s: trained (step %d, %d rounds), loaded from its checkpoint", name, int(state.step), meta["round"])
    else:
      logging.info("%s: resuming at step %d, round %d", name, int(state.step), int(meta["round"]) + 1)
  elif source is not None:
    state, best, assignment, meta, weights = source.restore(trainer.abstract, seqs.num_users)
    source.close()
    log.write({"kind": "continued", "model": name, "from": continue_from, "rounds": meta["round"],
               "passes": meta["passes"]})
    logging.info("%s: it is %s, trained by the same rules on the same data (%d rounds)", name, continue_from,
                 meta["round"])
  else:
    state = trainer.init_state() if start_params is None else trainer.warm_state(start_params)
    try:  # the initial assignment may train the init LM first (--init=embedding), which may stop
      best, assignment, weights = None, initial_assignment(), None
      interrupt.safe_point(f"after {name}'s initial assignment, before its first step", "nothing of it was saved "
                           "(it is made again, the same), and any model trained before it keeps its checkpoints")
    except BaseException:
      ckpts.close()
      raise
    meta = {**policy.first_meta(), "warm": policy.warm}
  if "mix" in meta:  # a resumed family that ended mixed (--mix_init) scores as it did
    trainer.set_mix(trainer.anchor, meta["mix"])

  def save(state, replace=False):
    meta["train_s"] = trained_before + time.perf_counter() - start
    ckpts.save(state, best, assignment, {**meta, "step": int(state.step), "num_users": seqs.num_users, "k": k,
                                         "rounds_cap": rounds, "cluster_params": cluster_spec(cfg, k),
                                         "model": dataclasses.asdict(cfg.model),
                                         "train": dataclasses.asdict(cfg.train)}, weights, replace=replace,
               anchor=trainer.anchor if "mix" in meta else None)

  scored = None  # the last E-step's [K, U] history NLL, while state.params are still the parameters it scored

  def periodic_save(state, step):
    """After each step: a checkpoint every --checkpoint_every steps, or now and stop on SIGTERM/SIGINT."""
    stopping = stop.requested(step)
    if stopping or step % t.checkpoint_every == 0:
      trainer.check_finite()  # no checkpoint holds what a step with a NaN loss did
      save(state)
    if stopping:
      raise interrupt.Preempted(name, step, stop.received)

  def stop_if_asked(state):  # where every process is at the same point, right after a checkpoint
    if stop.requested(int(state.step), boundary=True):
      raise interrupt.Preempted(name, int(state.step), stop.received)

  def validate(state, assignment_U=None, weights_UxK=None) -> tuple[float, float]:
    """Per-user mean and variance, under the family's assignment or the one given."""
    if assignment_U is None:
      assignment_U, weights_UxK = assignment, weights
    return validation.stats(trainer, state.params, assignment_U, weights_UxK)

  start, trained_before = time.perf_counter(), meta.get("train_s", 0.0)  # seconds, over every session of the run
  min_size = min_cluster_size(seqs.num_users, k, c.min_cluster_frac)
  if source is not None:
    save(state)  # its own checkpoint, so the family loads by its own name
  try:
    with interrupt.stop_handler() as stop:  # the command's, when it has one
      while not meta["done"]:
        round_index = meta["round"]
        plan = policy.plan(meta)
        batches = ClusterBatches(seqs, assignment, k, t.batch_size, cfg.model.context, plan.passes, t.seed,
                                 round_index, weights, balance=t.balance, max_repeat=t.max_repeat)
        per_epoch, total = batches.steps_per_epoch, batches.steps
        every, checks = plan.check_steps(per_epoch), plan.checks(per_epoch)
        # M-step: the K models train on their users until validation stops improving, at most plan.passes.
        if not meta["in_round"]:
          state = trainer.start_round(state, total, plan.round_lr)
          best = _snapshot(state)
          start_nll = validate(state) if policy.patience else (None, None)
          meta.update(in_round=True, best_check=0, best_nll=start_nll[0], best_var=start_nll[1])
        check = (int(state.step) - int(state.round_start)) // every
        label = (f"{name} anneal" if plan.kind == "anneal" else
                 f"{name} round {round_index + 1}/{rounds}{' (warm)' if plan.kind == 'warm' else ''}")
        while check < checks and not plan.stalled(check, meta["best_check"]):
          until = min((check + 1) * every, total)
          state = trainer.train_round(state, batches, log, on_step=periodic_save, until=until,
                                      label=f"{label} pass {until / per_epoch:.2f}/{plan.passes}",
                                      record={"model": name, "round": round_index + 1, "round_kind": plan.kind,
                                              "pass": round(until / per_epoch, 3)})
          check += 1
          if policy.patience:
            nll, var = validate(state)
            log.write({"kind": "validation", "model": name, "round": round_index + 1,
                       "pass": round(until / per_epoch, 3), "nll": nll, "var": var})
            if nll < meta["best_nll"]:
              best = _snapshot(state)
              meta.update(best_check=check, best_nll=nll, best_var=var)
          if check < checks and not plan.stalled(check, meta["best_check"]):
            save(state)  # the round's last validation is saved at the end of the round, below, at the same step
            stop_if_asked(state)
        steps = int(state.step) - int(state.round_start)
        kept = meta["best_check"] if policy.patience else check
        improved = kept > 0
        if improved:
          meta["kept_lr"] = policy.kept_lr(plan, kept, per_epoch)
        meta.update(round=round_index + 1, in_round=False, passes=meta["passes"] + steps / per_epoch,
                    tokens=meta["tokens"] + steps * batches.tokens_per_epoch / per_epoch)
        log.write({"kind": "stop", "model": name, "round": round_index + 1, "round_kind": plan.kind,
                   "passes": round(steps / per_epoch, 3), "best_pass": round(min(kept * every, total) / per_epoch, 3),
                   "improved": improved, "validation_nll": meta["best_nll"], "validation_var": meta["best_var"],
                   "tokens": steps * batches.tokens_per_epoch / per_epoch})
        logging.info("%s: %.2f passes, kept pass %.2f%s", label, steps / per_epoch,
                     min(kept * every, total) / per_epoch,
                     f" (validation per-user NLL {meta['best_nll']:.4f}, variance {meta['best_var']:.4f})"
                     if policy.patience else "")
        moved = None
        estep = policy.runs_estep(plan, meta, improved)
        reverted = bool(policy.patience) and meta["best_check"] < check

        def back_to_best(state):  # the round's best point (its start, when nothing beat it); the step goes on
          state = state.replace(params=best["params"], opt_state=best["opt_state"])
          return state, _snapshot(state)

        if reverted and improved:  # the E-step routes by the best point
          state, best = back_to_best(state)
        if estep:
          # E-step. When the round found nothing better than its start (the first round, which always ends in
          # one), it routes by the models as trained, its last point, not by the start it then returns to.
          assignment, weights, moved, scored_now = _reassign(name, trainer, state, seqs, assignment, weights, c.soft,
                                                             min_size, log, meta["round"], policy.route_part,
                                                             validate if policy.patience else None,
                                                             gate=improved)
        if reverted and not improved:  # back to the round's start
          state, best = back_to_best(state)
        if estep:
          # The E-step's scores stand for the parameters kept only if it scored them, on whole histories.
          scored = scored_now if improved and policy.route_part == "history" else None
          if moved.reseeded:
            state = trainer.copy_models(state, moved.source)
            best, scored = _snapshot(state), None
          moved = moved.moved
        elif improved:
          scored = None  # the parameters changed since they were last scored
        policy.end_round(plan, meta, improved, rounds, moved)
        if not improved:
          logging.info("%s: no validation improved on the round's start%s", label,
                       "" if not meta["done"] else "; the rounds end")
        if on_round is not None:
          on_round(assignment)
        save(state)
        stop_if_asked(state)
      if policy.interpolates and "alpha" not in meta:
        params, meta["alpha"] = _interpolate(name, trainer, state.params, validation, assignment, weights, log)
        state, best, scored = state.replace(params=params), None, None
        save(state, replace=True)  # the same step: the interpolated parameters are the family's
      if policy.mixes and "mix" not in meta:
        meta["mix"] = _fit_mix(name, trainer, state.params, validation, assignment, weights, log)
        scored = None
        save(state, replace=True)  # the same step, now with the anchor and the weights
  except interrupt.NonFiniteLoss as e:
    raise HetlmError(f"{name}: {e}; training stopped, and its last good checkpoint (step {ckpts.latest_step()}) "
                     f"is kept in {workdir / 'checkpoints' / name}") from None
  finally:  # also on an error or interrupt: pending checkpoint writes finish before the process goes on
    ckpts.close()
  train_s = meta.get("train_s", trained_before)  # as of the last checkpoint: a finished run's resume adds nothing
  return Trained(name, cfg, trainer, state.params, assignment, meta["round"], train_s, weights, meta["passes"],
                 scored, meta["tokens"])


INTERPOLATION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate_params(params, anchor: dict, alpha_K: np.ndarray, alpha_shared: float, spec: str, n_layers: int):
  """Model k's parameters alpha_k theta_k + (1 - alpha_k) theta_init (`anchor`: the init LM, one model), the
  shared part with `alpha_shared`: alpha 0 is the init LM, 1 the trained cluster model."""
  split = partition(spec, n_layers, anchor)
  alpha_K = jnp.asarray(alpha_K, jnp.float32)
  mix_K = lambda x_K, a: alpha_K.reshape((-1,) + (1,) * (x_K.ndim - 1)) * x_K + (1 - alpha_K.reshape(
    (-1,) + (1,) * (x_K.ndim - 1))) * a
  return {"shared": jax.tree.map(lambda x, a: alpha_shared * x + (1 - alpha_shared) * a, params["shared"],
                                 split["shared"]),
          "cluster": jax.tree.map(mix_K, params["cluster"], split["cluster"])}


def _fit_weights(k: int, validation: Validation, assignment_U: np.ndarray, per_user, rescore_own: bool):
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
    cluster_V = assignment_U[validation.users]
    by_w = {a: per_user(np.full(k, a), common) if rescore_own and a != common else scores[a]
            for a in INTERPOLATION_GRID}
    for c in range(k):
      mine = cluster_V == c
      if mine.any():
        w_K[c] = lowest(by_w, mine)
  return w_K, common, scores, per_user(w_K, common)


def _weights_record(kind: str, name: str, scores: dict, final: np.ndarray, **weights) -> dict:
  return {"kind": kind, "model": name, **weights, "validation_nll": float(np.nanmean(final)),
          "validation_var": float(np.nanvar(final)), "validation_trained": float(np.nanmean(scores[1.0])),
          "validation_init": float(np.nanmean(scores[0.0]))}


def _interpolate(name: str, trainer: Trainer, params, validation: Validation, assignment_U, weights_UxK,
                 log: MetricsLog):
  """--interpolate: every cluster model becomes alpha_k theta_k + (1 - alpha_k) theta_init, alpha by
  _fit_weights (the shared part takes the common alpha)."""
  k, spec, n_layers = trainer.k, cluster_spec(trainer.cfg, trainer.k), trainer.cfg.model.n_layers
  mixed = jax.jit(functools.partial(interpolate_params, spec=spec, n_layers=n_layers),
                  out_shardings=jax.tree.map(lambda x: x.sharding, trainer.abstract.params))
  per_user = lambda alpha_K, alpha_shared: validation.per_user(
    trainer, mixed(params, trainer.anchor, np.asarray(alpha_K, np.float32), alpha_shared), assignment_U, weights_UxK)
  # With no shared part (--cluster_params=all) the shared alpha changes nothing: no scoring runs again.
  alpha_K, common, scores, final = _fit_weights(k, validation, assignment_U, per_user,
                                                rescore_own=bool(jax.tree.leaves(params["shared"])))
  record = _weights_record("interpolate", name, scores, final, alpha=alpha_K.tolist(), alpha_shared=common)
  log.write(record)
  logging.info("%s: interpolated toward its init LM, alpha %s (shared %.2f): validation per-user NLL %.4f "
               "(trained %.4f, init LM %.4f)", name, alpha_K.tolist(), common, record["validation_nll"],
               record["validation_trained"], record["validation_init"])
  return mixed(params, trainer.anchor, alpha_K.astype(np.float32), common), record["alpha"]


def _fit_mix(name: str, trainer: Trainer, params, validation: Validation, assignment_U, weights_UxK,
             log: MetricsLog) -> list[float]:
  """--mix_init: model k predicts lam_k p_k + (1 - lam_k) p_init (p_init: `trainer.anchor`), lam by
  _fit_weights; the trainer keeps the mixture (Trainer.set_mix). Returns lam."""
  def per_user(lam_K, _):
    trainer.set_mix(trainer.anchor, lam_K)
    return validation.per_user(trainer, params, assignment_U, weights_UxK)

  lam_K, _, scores, final = _fit_weights(trainer.k, validation, assignment_U, per_user, rescore_own=False)
  record = _weights_record("mix", name, scores, final, lam=lam_K.tolist())
  log.write(record)
  logging.info("%s: mixed with its init LM in prediction space, lam %s: validation per-user NLL %.4f (trained "
               "%.4f, init LM %.4f)", name, lam_K.tolist(), record["validation_nll"], record["validation_trained"],
               record["validation_init"])
  return record["lam"]


def _continuable(workdir: Path, source: str | None, cfg: Config, k: int, rounds: int) -> Checkpoints | None:
  """The checkpoints of family `source`, if it finished by the same rules, config, K and cap of `rounds`."""
  if source is None or not (workdir / "checkpoints" / source).exists():
    return None
  ckpts = Checkpoints(workdir / "checkpoints" / source, cfg.train.keep_checkpoints)
  meta = ckpts.meta() if ckpts.latest_step() is not None else {}
  same = (meta.get("done") and not meta.get("in_round") and meta.get("k") == k and meta.get("rounds_cap") == rounds
          and meta.get("model") == dataclasses.asdict(cfg.model) and meta.get("train") == dataclasses.asdict(cfg.train)
          and meta.get("cluster_params") == cluster_spec(cfg, k))
  if not same:
    ckpts.close()
    return None
  return ckpts


def _reassign(name: str, trainer: Trainer, state, seqs: UserSequences, assignment: np.ndarray, weights, soft: bool,
              min_size: int, log: MetricsLog, round_index: int, part: str = "history", validate=None,
              gate: bool = False):
  """Scores `part` of every user's sequence (the whole history, or the routing tail) under every model;
  returns (assignment, weights, Reassignment, the [K, U] NLL sums). A user with nothing to score (a
  history too short for a routing tail) keeps their cluster. `validate(state, assignment, weights)`, if
  given, measures the validation before and after, logged with the round; with `gate`, a reassignment that
  makes it worse is not taken (nobody moves), as a round that makes it worse is not."""
  k, old_weights = trainer.k, weights
  interrupt.at_phase("estep")
  before = validate(state) if validate is not None else None
  nll_KxU, tokens_U = trainer.score(state.params, seqs, part, label=f"{name} scoring")
  nll_per_token_KxU = nll_KxU / np.maximum(tokens_U, 1)
  unrouted = np.flatnonzero(tokens_U == 0)
  nll_per_token_KxU[:, unrouted] = (np.arange(k)[:, None] != assignment[unrouted]).astype(float)
  if soft:  # the posterior over clusters of each user's history, with the clusters' shares as prior
    log_joint_KxU = log_shares(cluster_shares(assignment, weights, k))[:, None] - nll_KxU
    moved = reassign(-log_joint_KxU / np.maximum(tokens_U, 1), assignment, min_size)
    weights = np.exp(log_joint_KxU - logsumexp(log_joint_KxU, axis=0)).T
    # Users that re-seeding moved away from their most likely cluster belong to the new one alone.
    forced = np.flatnonzero(moved.assignment != np.argmax(weights, axis=1))
    weights[forced] = np.eye(k)[moved.assignment[forced]]
  else:
    moved = reassign(nll_per_token_KxU, assignment, min_size)
  if moved.reseeded:
    logging.warning("%s: re-seeded clusters %s by splitting %s (they fell below %d users)", name,
                    sorted(moved.reseeded), sorted(set(moved.reseeded.values())), min_size)
  hosts.check_same(f"{name}'s assignment after round {round_index}", moved.assignment)
  own = nll_per_token_KxU[moved.assignment, np.arange(seqs.num_users)]
  routed = tokens_U > 0
  record = {"kind": "round", "model": name, "round": round_index, "moved": moved.moved, "routed_by": part,
            "sizes": moved.sizes.tolist(), "reseeded": {str(a): b for a, b in moved.reseeded.items()},
            "history_nll_per_cluster": [float(own[routed & (moved.assignment == j)].mean())
                                        if (routed & (moved.assignment == j)).any() else None for j in range(k)],
            "history_nll": float(own[routed].mean()) if routed.any() else None}
  if validate is not None:
    after = validate(state, moved.assignment, weights) if moved.moved else before
    if moved.reseeded:  # the validation users' models are copied after this; not measured here
      after = (None, None)
    record.update(validation_before=before[0], validation_after=after[0], validation_var_before=before[1],
                  validation_var_after=after[1])
    if gate and after[0] is not None and after[0] > before[0]:
      logging.info("%s round %d: reassignment would raise the validation per-user NLL from %.4f to %.4f; not taken",
                   name, round_index, before[0], after[0])
      record["taken"] = False
      stay = Reassignment(assignment, 0.0, np.bincount(assignment, minlength=k), {}, np.arange(k))
      log.write(record)
      return assignment, old_weights, stay, nll_KxU
  log.write(record)
  logging.info("%s round %d: %.2f%% of users moved; sizes %s%s", name, round_index, 100 * moved.moved,
               moved.sizes.tolist(), "" if validate is None or after[0] is None else
               f"; validation per-user NLL {before[0]:.4f} before, {after[0]:.4f} after")
  return moved.assignment, weights, moved, nll_KxU


def warmed(cfg: Config, k: int) -> bool:
  """Whether HeTLM's K models start from a single LM trained first ('init_single')."""
  return k > 1 and cfg.cluster.init == "embedding" and cfg.cluster.warm_start


def init_lm(cfg: Config, seqs: UserSequences, workdir: Path, log: MetricsLog, validation: Validation | None) -> Trained:
  """The single LM HeTLM starts from ('init_single'): at most --init_rounds rounds from scratch, then annealed;
  trained once, then loaded from its checkpoints."""
  return train_family("init_single", cfg, 1, seqs, workdir, log, lambda: np.zeros(seqs.num_users, np.int32),
                      cfg.cluster.init_rounds, validation)


def initial_assignment(cfg: Config, k: int, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog,
                       validation: Validation | None):
  """The --init strategy as (assignment, warm-start params) thunks; 'embedding' first trains a single LM
  (init_lm) whose mean hidden states are clustered and, with --warm_start, copied."""
  c, seed = cfg.cluster, cfg.train.seed
  no_warm = lambda: None
  if k == 1:
    return (lambda: np.zeros(seqs.num_users, np.int32)), no_warm
  if c.init == "random":
    return (lambda: random_balanced(seqs.num_users, k, seed)), no_warm
  if c.init == "features":
    return (lambda: interrupt.at_phase("kmeans") or kmeans_on_features(seqs, vocab_size, k, seed)), no_warm
  single = functools.lru_cache(maxsize=1)(lambda: init_lm(cfg, seqs, workdir, log, validation))

  def initial():
    lm = single()
    interrupt.at_phase("kmeans")
    return kmeans(lm.trainer.embed(lm.params, seqs)[0], k, seed)

  return initial, ((lambda: single().params) if c.warm_start else no_warm)


def train_hetlm(cfg: Config, k: int, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog,
                validation: Validation | None, name: str = "hetlm", on_round=None) -> Trained:
  """HeTLM with K cluster models from its initial assignment (K=1: a single LM). Warm-started, its rounds
  go on from the init LM by the warm rules of cluster/policy.py."""
  initial, warm = initial_assignment(cfg, k, seqs, vocab_size, workdir, log, validation)
  rounds = cfg.cluster.rounds if k > 1 else 1
  return train_family(name, cfg, k, seqs, workdir, log, initial, rounds, validation, on_round=on_round,
                      warm_params=warm)


def train_single_ft(cfg: Config, seqs: UserSequences, workdir: Path, log: MetricsLog, validation: Validation | None,
                    rounds: int) -> Trained:
  """The K=1 control (`single_ft`): the init LM fine-tuned exactly as HeTLM's clusters are (same warm rules,
  `rounds` rounds at most, no E-step), so that HeTLM minus single_ft is what clustering adds."""
  zeros = lambda: np.zeros(seqs.num_users, np.int32)
  return train_family("single_ft", cfg, 1, seqs, workdir, log, zeros, rounds, validation,
                      warm_params=lambda: init_lm(cfg, seqs, workdir, log, validation).params)
