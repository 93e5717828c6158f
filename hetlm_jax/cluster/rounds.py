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
from hetlm_jax.cluster.assign import (cluster_shares, kmeans, kmeans_on_features, log_shares, min_cluster_size,
                                      random_balanced, reassign)
from hetlm_jax.config import Config
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.errors import HetlmError
from hetlm_jax.train import interrupt
from hetlm_jax.train.batches import ClusterBatches
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog
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
  passes: int = 0  # passes over every user trained, over all rounds (early stopping decides how many)
  # [K, U] NLL sums of every user's history under every model of `params`, from the last E-step when it scored
  # exactly these parameters (the evaluation's mixture posterior needs the same numbers); else None.
  history_nll: np.ndarray | None = None


@dataclasses.dataclass
class Validation:
  """Held-out targets of a slice of the training users, which decide when a round stops training.

  Split in time, `users` are their indices among the training users: they train on their histories, their
  targets are scored by their own cluster's model, and the evaluation leaves them out. Split by user,
  `users` is None: they never train, and their whole sequences are scored by the mixture likelihood.
  """
  seqs: UserSequences
  users: np.ndarray | None

  def nll(self, trainer: Trainer, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None) -> float:
    """Nats per scored target token, pooled over the validation users."""
    nll_KxV, tokens_V = trainer.score(params, self.seqs, "target", label="validation")
    if self.users is not None:
      nll_V = nll_KxV[assignment_U[self.users], np.arange(self.seqs.num_users)]
    else:
      log_prior_K = log_shares(cluster_shares(assignment_U, weights_UxK, trainer.k))
      nll_V = -logsumexp(log_prior_K[:, None] - nll_KxV, axis=0)
    return float(nll_V.sum() / max(tokens_V.sum(), 1))


def _snapshot(state) -> dict:
  """A copy of the params and optimizer state that outlives the next (donating) train step."""
  return jax.tree.map(jnp.copy, {"params": state.params, "opt_state": state.opt_state})


def train_family(name: str, cfg: Config, k: int, seqs: UserSequences, workdir: Path, log: MetricsLog,
                 initial_assignment, rounds: int, validation: Validation | None, on_round=None,
                 warm_params=lambda: None, continue_from: str | None = None) -> Trained:
  """Trains (or resumes) one model family in WORKDIR/checkpoints/NAME for at most `rounds` rounds.

  Each round is one cycle of the learning-rate schedule over at most `--epochs` passes, at least half of
  them; after each pass the validation NLL is measured, and after `--patience` passes without a better one
  the round stops and returns to its best pass (a round never leaves the validation NLL worse than it found
  it). With K > 1 the round then ends with the E-step. Training stops after `rounds` rounds, after a round
  that did not improve on its start, or (K > 1) once fewer than `tolerance` of users move. `initial_assignment()` and
  `warm_params()` are called only when there is no checkpoint to resume.

  `continue_from`: a finished family trained by the same rules with the same config, K and data (the single
  LM that warm-starts HeTLM): with no checkpoint of its own, this family starts from that one's last one,
  which is exactly where its own first rounds would have ended, and trains on from there.
  """
  c, t = cfg.cluster, cfg.train
  patience = t.patience if validation is not None else 0
  trainer = Trainer(cfg, k)
  ckpts = Checkpoints(workdir / "checkpoints" / name, t.keep_checkpoints)
  source = _continuable(workdir, continue_from, cfg, k, rounds) if ckpts.latest_step() is None else None
  if ckpts.latest_step() is not None:
    state, best, assignment, meta, weights = ckpts.restore(trainer.abstract, seqs.num_users)
    logging.info("%s: resuming at step %d, round %d", name, int(state.step), int(meta["round"]) + 1)
  elif source is not None:
    state, best, assignment, meta, weights = source.restore(trainer.abstract, seqs.num_users)
    source.close()
    meta["done"] = bool(meta.get("converged")) or meta["round"] >= rounds
    log.write({"kind": "continued", "model": name, "from": continue_from, "rounds": meta["round"],
               "passes": meta["passes"]})
    logging.info("%s: its first %d rounds are %s's (same config and data); continuing from step %d", name,
                 meta["round"], continue_from, int(state.step))
  else:
    warm = warm_params()
    state = trainer.init_state() if warm is None else trainer.warm_state(warm)
    best, assignment, weights = None, initial_assignment(), None
    meta = {"round": 0, "done": False, "in_round": False, "passes": 0}

  def save(state):
    meta["train_s"] = trained_before + time.perf_counter() - start
    ckpts.save(state, best, assignment, {**meta, "step": int(state.step), "num_users": seqs.num_users, "k": k,
                                         "cluster_params": cluster_spec(cfg, k),
                                         "model": dataclasses.asdict(cfg.model),
                                         "train": dataclasses.asdict(cfg.train)}, weights)

  stop = interrupt.StopRequest()
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

  def validate(state) -> float:
    return validation.nll(trainer, state.params, assignment, weights)

  start, trained_before = time.perf_counter(), meta.get("train_s", 0.0)  # seconds, over every session of the run
  min_size = min_cluster_size(seqs.num_users, k, c.min_cluster_frac)
  # The schedule decays over the cap: passes near its peak learning rate are noisy, and the gains come as it
  # decays, so patience only counts once half the cap has been trained.
  min_passes = -(-t.epochs // 2)
  try:
    with stop:
      while not meta["done"]:
        round_index = meta["round"]
        batches = ClusterBatches(seqs, assignment, k, t.batch_size, cfg.model.context, t.epochs, t.seed,
                                 round_index, weights, balance=t.balance)
        per_epoch = batches.steps_per_epoch
        # M-step: the K models train on their users, at most --epochs passes, until validation stops improving.
        if not meta["in_round"]:
          state = trainer.start_round(state, batches.steps)
          best = _snapshot(state)
          meta.update(in_round=True, best_epoch=0, best_nll=validate(state) if patience else None)
        epoch = (int(state.step) - int(state.round_start)) // per_epoch
        stalled = lambda: bool(patience) and epoch >= min_passes and epoch - meta["best_epoch"] >= patience
        while epoch < t.epochs and not stalled():
          state = trainer.train_round(state, batches, log, on_step=periodic_save, until=(epoch + 1) * per_epoch,
                                      label=f"{name} round {round_index + 1}/{rounds} pass {epoch + 1}/{t.epochs}",
                                      record={"model": name, "round": round_index + 1, "pass": epoch + 1})
          epoch += 1
          if patience:
            nll = validate(state)
            log.write({"kind": "validation", "model": name, "round": round_index + 1, "pass": epoch, "nll": nll})
            if nll < meta["best_nll"]:
              best = _snapshot(state)
              meta.update(best_epoch=epoch, best_nll=nll)
          if epoch < t.epochs and not stalled():
            save(state)  # the round's last pass is saved at the end of the round, below, at the same step
            stop_if_asked(state)
        if patience and meta["best_epoch"] < epoch:  # back to the best pass; the step counter goes on
          state = state.replace(params=best["params"], opt_state=best["opt_state"])
          best = _snapshot(state)
        if not (patience and meta["best_epoch"] == 0):  # else the round's start: the parameters last scored
          scored = None
        log.write({"kind": "stop", "model": name, "round": round_index + 1, "passes": epoch,
                   "best_pass": meta["best_epoch"] if patience else epoch, "validation_nll": meta["best_nll"]})
        logging.info("%s round %d: %d passes, kept pass %d%s", name, round_index + 1, epoch,
                     meta["best_epoch"] if patience else epoch,
                     f" (validation NLL {meta['best_nll']:.4f})" if patience else "")
        meta.update(round=round_index + 1, in_round=False, passes=meta["passes"] + epoch)
        meta["done"] = meta["round"] >= rounds
        if patience and meta["best_epoch"] == 0:
          # No pass beat the round's start: another warm restart of the schedule is not worth training, and with
          # K > 1 the models are those the last E-step (or the warm start) left, so another E-step could only
          # shuffle ties. The rounds have converged.
          logging.info("%s round %d: no pass improved the validation NLL; the rounds end", name, round_index + 1)
          meta.update(done=True, converged=True)
        elif k > 1:  # E-step
          assignment, weights, moved, scored = _reassign(name, trainer, state, seqs, assignment, weights, c.soft,
                                                         min_size, log, meta["round"])
          if moved.reseeded:
            state = trainer.copy_models(state, moved.source)
            best, scored = _snapshot(state), None
          meta["converged"] = bool(moved.moved < c.tolerance)
          meta["done"] = meta["done"] or meta["converged"]
        if on_round is not None:
          on_round(assignment)
        save(state)
        stop_if_asked(state)
  except interrupt.NonFiniteLoss as e:
    raise HetlmError(f"{name}: {e}; training stopped, and its last good checkpoint (step {ckpts.latest_step()}) "
                     f"is kept in {workdir / 'checkpoints' / name}") from None
  finally:  # also on an error or interrupt: pending checkpoint writes finish before the process goes on
    ckpts.close()
  train_s = meta.get("train_s", trained_before)  # as of the last checkpoint: a finished run's resume adds nothing
  return Trained(name, cfg, trainer, state.params, assignment, meta["round"], train_s, weights, meta["passes"],
                 scored)


def _continuable(workdir: Path, source: str | None, cfg: Config, k: int, rounds: int) -> Checkpoints | None:
  """The checkpoints of family `source`, if it finished by the same rules, config and K within `rounds`."""
  if source is None or not (workdir / "checkpoints" / source).exists():
    return None
  ckpts = Checkpoints(workdir / "checkpoints" / source, cfg.train.keep_checkpoints)
  meta = ckpts.meta() if ckpts.latest_step() is not None else {}
  same = (meta.get("done") and not meta.get("in_round") and meta.get("k") == k and meta["round"] <= rounds
          and meta.get("model") == dataclasses.asdict(cfg.model) and meta.get("train") == dataclasses.asdict(cfg.train)
          and meta.get("cluster_params") == cluster_spec(cfg, k))
  if not same:
    ckpts.close()
    return None
  return ckpts


def _reassign(name: str, trainer: Trainer, state, seqs: UserSequences, assignment: np.ndarray, weights, soft: bool,
              min_size: int, log: MetricsLog, round_index: int):
  """Scores every user's history under every model; returns (assignment, weights, Reassignment, the [K, U]
  history NLL sums)."""
  k = trainer.k
  nll_KxU, tokens_U = trainer.score(state.params, seqs, "history", label=f"{name} scoring")
  nll_per_token_KxU = nll_KxU / np.maximum(tokens_U, 1)
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
  record = {"kind": "round", "model": name, "round": round_index, "moved": moved.moved,
            "sizes": moved.sizes.tolist(), "reseeded": {str(a): b for a, b in moved.reseeded.items()},
            "history_nll_per_cluster": [float(own[moved.assignment == j].mean()) if moved.sizes[j] else None
                                        for j in range(k)],
            "history_nll": float(own.mean())}
  log.write(record)
  logging.info("%s round %d: %.2f%% of users moved; sizes %s; history NLL %.4f", name, round_index,
               100 * moved.moved, moved.sizes.tolist(), record["history_nll"])
  return moved.assignment, weights, moved, nll_KxU


def warmed(cfg: Config, k: int) -> bool:
  """Whether HeTLM's K models start from a single LM trained first ('init_single')."""
  return k > 1 and cfg.cluster.init == "embedding" and cfg.cluster.warm_start


def initial_assignment(cfg: Config, k: int, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog,
                       validation: Validation | None):
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
    return train_family("init_single", cfg, 1, seqs, workdir, log, lambda: np.zeros(seqs.num_users, np.int32),
                        c.init_rounds, validation)

  initial = lambda: kmeans(single().trainer.embed(single().params, seqs)[0], k, seed)
  return initial, ((lambda: single().params) if c.warm_start else no_warm)


def train_hetlm(cfg: Config, k: int, seqs: UserSequences, vocab_size: int, workdir: Path, log: MetricsLog,
                validation: Validation | None, name: str = "hetlm", on_round=None) -> Trained:
  """HeTLM with K cluster models from its initial assignment (K=1: a single LM)."""
  initial, warm = initial_assignment(cfg, k, seqs, vocab_size, workdir, log, validation)
  rounds = cfg.cluster.rounds if k > 1 else 1
  if warmed(cfg, k):  # fine-tuning from a trained LM: a gentler learning rate keeps what it learned
    cfg = cfg.replace(train=dataclasses.replace(cfg.train,
                                                learning_rate=cfg.train.learning_rate * cfg.cluster.warm_lr_scale))
  return train_family(name, cfg, k, seqs, workdir, log, initial, rounds, validation, on_round=on_round,
                      warm_params=warm)
