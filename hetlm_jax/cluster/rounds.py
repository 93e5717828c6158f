"""The HeTLM rounds, top to bottom: initial assignment → [M-step: train the K models until the validation
NLL stops improving → E-step: move each user to the model that explains their history best (hard), or
weight every model by its posterior (soft) → re-seed degenerate clusters] until few users move; then, for a
warm-started family, the pull back toward the LM it started from (cluster/toward_init.py).

A single LM is the same loop with K=1 and no E-step, so every model family trains by the same rule. The
rules (schedules, stopping, gates) are cluster/policy.py's; a round's state is a RoundState, and its
checkpoints (train/checkpoint.py) hold all of it, so a resumed run goes on exactly.
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

from hetlm_jax import hosts, interrupt
from hetlm_jax.cluster.assign import (
  Reassignment,
  cluster_shares,
  embedding_kmeans,
  kmeans_on_features,
  log_shares,
  min_cluster_size,
  random_balanced,
  random_by_id,
  reassign,
)
from hetlm_jax.cluster.policy import Policy, Position, RoundPlan
from hetlm_jax.cluster.toward_init import fit_mix, interpolate
from hetlm_jax.cluster.validation import Validation
from hetlm_jax.config import Config
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.errors import HetlmError
from hetlm_jax.train.batches import ClusterBatches, ShardedBatches, training_batches
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog
from hetlm_jax.train.state import TrainState, cluster_spec
from hetlm_jax.workdir import checkpoint_dir


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
  # (users, [K, R]): this process group's users' history NLL sums under every model of `params`
  # (Trainer.score_share), from the last E-step when it scored exactly these parameters (the evaluation's mixture
  # posterior needs the same numbers); else None.
  history_share: tuple | None = None
  tokens: float = 0.0  # real tokens trained on, over all rounds (a token repeated by --balance counts each time)
  kept_init_lm: bool = False  # warm-started, it ended as the LM it started from (Position.kept_its_start)
  init_lm: Trained | None = None  # that LM ('init_single'), for a family warm-started from it
  clusters_as_init: list[int] = dataclasses.field(default_factory=list)  # Position.clusters_as_init


@dataclasses.dataclass
class RoundState:
  """What a family carries from one step and round to the next; its checkpoints hold all of it."""

  state: TrainState  # the K models and their optimizer, at the current step
  best: dict | None  # the kept reference: params and optimizer state at the round's best validation so far
  assignment_U: np.ndarray  # each user's cluster
  weights_UxK: np.ndarray | None  # soft EM's responsibilities, else None
  at: Position  # the run position: rounds, passes, early stopping, the weights toward the init LM
  # The last E-step's history NLL sums of this group's users (`Trainer.score_share`: users, [K, R], tokens [R]),
  # while `state` still holds the parameters it scored; else None.
  scored: tuple | None = None


@dataclasses.dataclass
class FamilyRun:
  """The fixed parts of one family's training: what it is, where it is saved, and by which rules it trains."""

  name: str
  cfg: Config
  k: int
  seqs: UserSequences
  log: MetricsLog
  validation: Validation | None
  rounds: int  # the cap of rounds
  policy: Policy
  trainer: Trainer
  ckpts: Checkpoints
  trained_before: float = 0.0  # seconds trained in earlier sessions of the run
  started: float = dataclasses.field(default_factory=time.perf_counter)
  stop: interrupt.StopRequest | None = None  # the command's stop handler, while the rounds run

  @property
  def min_size(self) -> int:
    """Users below which a cluster is re-seeded."""
    (users,) = hosts.total(np.array(self.seqs.num_users))
    return min_cluster_size(int(users), self.k, self.cfg.cluster.min_cluster_frac)

  def save(self, rs: RoundState, state: TrainState | None = None, replace: bool = False) -> None:
    """A checkpoint of `rs` (at `state`, a step within the round, when given)."""
    state = rs.state if state is None else state
    rs.at.train_s = self.trained_before + time.perf_counter() - self.started
    cfg = self.cfg
    self.ckpts.save(
      state,
      rs.best,
      rs.assignment_U,
      {
        **rs.at.to_meta(),
        "step": int(state.step),
        "num_users": self.seqs.num_users,
        "k": self.k,
        "rounds_cap": self.rounds,
        "cluster_params": cluster_spec(cfg, self.k),
        "model": dataclasses.asdict(cfg.model),
        "train": dataclasses.asdict(cfg.train),
      },
      rs.weights_UxK,
      replace=replace,
      anchor=self.trainer.anchor if rs.at.mix is not None else None,
    )

  def periodic_save(self, rs: RoundState, state: TrainState, step: int) -> None:
    """After each step: a checkpoint every --checkpoint_every steps, or now and stop on SIGTERM/SIGINT."""
    stopping = self.stop.requested(step)
    if stopping or step % self.cfg.train.checkpoint_every == 0:
      self.trainer.check_finite()  # no checkpoint holds what a step with a NaN loss did
      self.save(rs, state)
    if stopping:
      raise interrupt.Preempted(self.name, step, self.stop.received)

  def stop_if_asked(self, state: TrainState) -> None:
    """Stops where every process is at the same point, right after a checkpoint, if a signal asked to."""
    if self.stop.requested(int(state.step), boundary=True):
      raise interrupt.Preempted(self.name, int(state.step), self.stop.received)

  def validate(self, params, assignment_U: np.ndarray, weights_UxK: np.ndarray | None) -> tuple[float, float]:
    """The validation users' per-user mean NLL and its variance under `params` and an assignment."""
    return self.validation.stats(self.trainer, params, assignment_U, weights_UxK)

  def result(self, rs: RoundState) -> Trained:
    """The trained family (seconds as of its last checkpoint: a finished run's resume adds nothing)."""
    return Trained(
      self.name,
      self.cfg,
      self.trainer,
      rs.state.params,
      rs.assignment_U,
      rs.at.round,
      rs.at.train_s,
      rs.weights_UxK,
      rs.at.passes,
      None if rs.scored is None else rs.scored[:2],
      rs.at.tokens,
      rs.at.kept_its_start(),
      clusters_as_init=rs.at.clusters_as_init(self.k, bool(jax.tree.leaves(rs.state.params["shared"]))),
    )


def _snapshot(state: TrainState) -> dict:
  """A copy of the params and optimizer state that outlives the next (donating) train step."""
  return jax.tree.map(jnp.copy, {"params": state.params, "opt_state": state.opt_state})


def train_family(
  name: str,
  cfg: Config,
  k: int,
  seqs: UserSequences,
  workdir: Path,
  log: MetricsLog,
  initial_assignment,
  rounds: int,
  validation: Validation | None,
  on_round=None,
  warm_params=lambda: None,
  continue_from: str | None = None,
) -> Trained:
  """Trains (or resumes) one model family in WORKDIR/checkpoints/NAME for at most `rounds` rounds (plus an
  anneal), by the rules of cluster/policy.py.

  Each round is one cycle of the learning-rate schedule; at each validation the validation users' per-user
  mean NLL is measured, and after `--patience` validations without a better one the round stops and
  returns to its best point (a round never leaves the validation NLL worse than it found it). With K > 1
  the round then ends with the E-step. `initial_assignment()` is called only when there is no checkpoint to
  resume; `warm_params()` (a trained single LM, or None) when there is none, or when --prox,
  --interpolate or --mix_init needs it. `on_round(assignment_U)` is called after every round.

  `continue_from`: a finished family trained by the same rules with the same config, K, data and rounds
  (the single LM that warm-starts HeTLM): with no checkpoint of its own, this family is a copy of that one.
  """
  interrupt.safe_point(f"before training {name}", "every model trained before it is checkpointed")
  run, rs = open_family(
    name, cfg, k, seqs, workdir, log, initial_assignment, rounds, validation, warm_params, continue_from
  )
  try:
    with interrupt.stop_handler() as run.stop:  # the command's, when it has one
      while not rs.at.done:
        plan = run.policy.plan(rs.at)
        rows = run.trainer.batch_block(k)[1]  # the rows of every global batch this process builds
        batches = training_batches(cfg, seqs, rs.assignment_U, k, plan.passes, rs.at.round, rs.weights_UxK, rows)
        checks, improved = m_step(run, rs, plan, batches)
        end_round(run, rs, plan, checks, improved)
        if on_round is not None:
          on_round(rs.assignment_U)
        run.save(rs)
        run.stop_if_asked(rs.state)
      pull_toward_init(run, rs)
  except interrupt.NonFiniteLoss as e:
    raise HetlmError(
      f"{name}: {e}; training stopped, and its last good checkpoint (step {run.ckpts.latest_step()}) "
      f"is kept in {checkpoint_dir(workdir, name)}"
    ) from None
  finally:  # also on an error or interrupt: pending checkpoint writes finish before the process goes on
    run.ckpts.close()
  return run.result(rs)


def open_family(
  name: str,
  cfg: Config,
  k: int,
  seqs: UserSequences,
  workdir: Path,
  log: MetricsLog,
  initial_assignment,
  rounds: int,
  validation: Validation | None,
  warm_params,
  continue_from: str | None,
) -> tuple[FamilyRun, RoundState]:
  """The family and its round state: resumed from its checkpoint, copied from `continue_from`'s, or new (from
  scratch or `warm_params()`, on `initial_assignment()`)."""
  c, t = cfg.cluster, cfg.train
  warm = warm_params if continue_from is None else (lambda: None)
  ckpts = Checkpoints(checkpoint_dir(workdir, name), t.keep_checkpoints)
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
    state, best, assignment_U, meta, weights_UxK = ckpts.restore(trainer.abstract, seqs.num_users)
    at = Position.from_meta(meta)
    if at.done:
      logging.info("%s: trained (step %d, %d rounds), loaded from its checkpoint", name, int(state.step), at.round)
    else:
      logging.info("%s: resuming at step %d, round %d", name, int(state.step), at.round + 1)
  elif source is not None:
    state, best, assignment_U, meta, weights_UxK = source.restore(trainer.abstract, seqs.num_users)
    source.close()
    at = Position.from_meta(meta)
    log.write({"kind": "continued", "model": name, "from": continue_from, "rounds": at.round, "passes": at.passes})
    logging.info("%s: it is %s, trained by the same rules on the same data (%d rounds)", name, continue_from, at.round)
  else:
    state = trainer.init_state() if start_params is None else trainer.warm_state(start_params)
    try:  # the initial assignment may train the init LM first (--init=embedding), which may stop
      best, assignment_U, weights_UxK = None, initial_assignment(), None
      interrupt.safe_point(
        f"after {name}'s initial assignment, before its first step",
        "nothing of it was saved (it is made again, the same), and any model trained before it keeps its checkpoints",
      )
    except BaseException:
      ckpts.close()
      raise
    at = policy.first_position()
  if at.mix is not None:  # a resumed family that ended mixed (--mix_init) scores as it did
    trainer.set_mix(trainer.anchor, at.mix)
  run = FamilyRun(name, cfg, k, seqs, log, validation, rounds, policy, trainer, ckpts, trained_before=at.train_s)
  rs = RoundState(state, best, assignment_U, weights_UxK, at)
  if source is not None:
    run.save(rs)  # its own checkpoint, so the family loads by its own name
  return run, rs


def m_step(
  run: FamilyRun, rs: RoundState, plan: RoundPlan, batches: ClusterBatches | ShardedBatches
) -> tuple[int, bool]:
  """The M-step: the K models train on their users, validated every plan.val_every passes, until `patience`
  validations bring nothing better or plan.passes are trained; the round's best point is kept in rs.best.
  Records the round's stop; returns (validations made, whether the round improved on its start)."""
  at, trainer, name = rs.at, run.trainer, run.name
  round_index, per_epoch, total = at.round, batches.steps_per_epoch, batches.steps
  every, checks = plan.check_steps(per_epoch), plan.checks(per_epoch)
  if not at.in_round:
    rs.state = trainer.start_round(rs.state, total, plan.round_lr)
    rs.best = _snapshot(rs.state)
    at.best_nll, at.best_var = (
      run.validate(rs.state.params, rs.assignment_U, rs.weights_UxK) if run.policy.patience else (None, None)
    )
    at.in_round, at.best_check = True, 0
  check = (int(rs.state.step) - int(rs.state.round_start)) // every
  label = _label(run, plan, round_index)
  while check < checks and not plan.stalled(check, at.best_check):
    until = min((check + 1) * every, total)
    rs.state = trainer.train_round(
      rs.state,
      batches,
      run.log,
      on_step=functools.partial(run.periodic_save, rs),
      until=until,
      label=f"{label} pass {until / per_epoch:.2f}/{plan.passes}",
      record={"model": name, "round": round_index + 1, "round_kind": plan.kind, "pass": round(until / per_epoch, 3)},
    )
    check += 1
    if run.policy.patience:
      nll, var = run.validate(rs.state.params, rs.assignment_U, rs.weights_UxK)
      run.log.write(
        {
          "kind": "validation",
          "model": name,
          "round": round_index + 1,
          "pass": round(until / per_epoch, 3),
          "nll": nll,
          "var": var,
        }
      )
      if nll < at.best_nll:
        rs.best = _snapshot(rs.state)
        at.best_check, at.best_nll, at.best_var = check, nll, var
    if check < checks and not plan.stalled(check, at.best_check):
      run.save(rs)  # the round's last validation is saved at the end of the round, at the same step
      run.stop_if_asked(rs.state)
  steps = int(rs.state.step) - int(rs.state.round_start)
  kept = at.best_check if run.policy.patience else check
  improved = kept > 0
  if improved:
    at.kept_lr = run.policy.kept_lr(plan, kept, per_epoch)
  at.round, at.in_round, at.improved = round_index + 1, False, at.improved or improved
  at.passes += steps / per_epoch
  at.tokens += steps * batches.tokens_per_epoch / per_epoch
  run.log.write(
    {
      "kind": "stop",
      "model": name,
      "round": round_index + 1,
      "round_kind": plan.kind,
      "passes": round(steps / per_epoch, 3),
      "best_pass": round(min(kept * every, total) / per_epoch, 3),
      "improved": improved,
      "validation_nll": at.best_nll,
      "validation_var": at.best_var,
      "tokens": steps * batches.tokens_per_epoch / per_epoch,
    }
  )
  logging.info(
    "%s: %.2f passes, kept pass %.2f%s",
    label,
    steps / per_epoch,
    min(kept * every, total) / per_epoch,
    f" (validation per-user NLL {at.best_nll:.4f}, variance {at.best_var:.4f})" if run.policy.patience else "",
  )
  return check, improved


def end_round(run: FamilyRun, rs: RoundState, plan: RoundPlan, checks: int, improved: bool) -> None:
  """After the M-step: back to the round's best point, the E-step (K > 1; on the best point when the round
  improved, else on the models as trained), re-seeding, and the policy's decision whether rounds go on."""
  at = rs.at
  estep = run.policy.runs_estep(plan, at, improved)
  reverted = bool(run.policy.patience) and at.best_check < checks

  def back_to_best() -> None:  # the round's best point (its start, when nothing beat it); the step goes on
    rs.state = rs.state.replace(params=rs.best["params"], opt_state=rs.best["opt_state"])
    rs.best = _snapshot(rs.state)

  moved = None
  if reverted and improved:  # the E-step routes by the best point
    back_to_best()
  if estep:
    # E-step. When the round found nothing better than its start (the first round, which always ends in one),
    # it routes by the models as trained, its last point, not by the start it then returns to.
    validate = functools.partial(run.validate, rs.state.params) if run.policy.patience else None
    rs.assignment_U, rs.weights_UxK, moved, scored = e_step(
      run, rs.state, rs.assignment_U, rs.weights_UxK, at.round, gate=improved, validate=validate
    )
  if reverted and not improved:  # back to the round's start
    back_to_best()
  if estep:
    # The E-step's scores stand for the parameters kept only if it scored them, on whole histories.
    rs.scored = scored if improved and run.policy.route_part == "history" else None
    if moved.reseeded:
      rs.state = run.trainer.copy_models(rs.state, moved.source)
      rs.best, rs.scored = _snapshot(rs.state), None
    moved = moved.moved
  elif improved:
    rs.scored = None  # the parameters changed since they were last scored
  run.policy.end_round(plan, at, improved, run.rounds, moved)
  if not improved:
    logging.info(
      "%s: no validation improved on the round's start%s",
      _label(run, plan, at.round - 1),
      "" if not at.done else "; the rounds end",
    )


def _label(run: FamilyRun, plan: RoundPlan, round_index: int) -> str:
  """How the progress line and the log name round `round_index` (from 0) of the family."""
  if plan.kind == "anneal":
    return f"{run.name} anneal"
  return f"{run.name} round {round_index + 1}/{run.rounds}{' (warm)' if plan.kind == 'warm' else ''}"


def e_step(
  run: FamilyRun,
  state: TrainState,
  assignment_U: np.ndarray,
  weights_UxK: np.ndarray | None,
  round_index: int,
  gate: bool = False,
  validate=None,
) -> tuple[np.ndarray, np.ndarray | None, Reassignment, tuple]:
  """Scores the routing part of every user's sequence (the whole history, or the routing tail) under every
  model after round `round_index` and moves users: to the lowest per-token NLL (hard), or weighted by the
  posterior (--soft); then no cluster below its minimum size. Returns (assignment, weights, Reassignment, this
  group's scores as `Trainer.score_share` gives them). A user with nothing to score (a history too short for a
  routing tail) keeps their cluster. `validate(assignment_U, weights_UxK)`, if given, measures the validation
  before and after, logged with the round; with `gate`, a reassignment that makes it worse is not taken (nobody
  moves), as a round that makes it worse is not."""
  name, k = run.name, run.k
  interrupt.at_phase("estep")
  before = validate(assignment_U, weights_UxK) if validate is not None else None
  # Each group of processes scores and moves its own share of the users (`users`); what passes between them is
  # the clusters' sizes and, for every user, the new cluster (and the soft weights), not the K scores.
  scored = run.trainer.score_share(state.params, run.seqs, run.policy.route_part, label=f"{name} scoring")
  users, nll_KxR, tokens_R = scored
  nll_per_token_KxR = nll_KxR / np.maximum(tokens_R, 1)
  current_R = assignment_U[users]
  unrouted = np.flatnonzero(tokens_R == 0)
  nll_per_token_KxR[:, unrouted] = (np.arange(k)[:, None] != current_R[unrouted]).astype(float)
  share_K = cluster_shares(assignment_U, weights_UxK, k)
  moved, weights_RxK = _move_users(run, share_K, nll_KxR, nll_per_token_KxR, tokens_R, current_R)
  record = _round_record(run, round_index, moved, nll_per_token_KxR, tokens_R)
  gather = functools.partial(run.trainer.gather_users, users, run.seqs.num_users)
  if weights_RxK is None:
    (assignment_after_U,), new_weights_UxK = gather(moved.assignment), None
  else:
    assignment_after_U, weights_KxU = gather(moved.assignment, weights_RxK.T)
    new_weights_UxK = np.ascontiguousarray(weights_KxU.T)
  moved = dataclasses.replace(moved, assignment=assignment_after_U)
  # With --own_users each process holds its own users' clusters: the sizes (summed) must agree.
  same = moved.sizes if hosts.own_users() else moved.assignment
  hosts.check_same(f"{name}'s assignment after round {round_index}", same)
  if validate is not None:
    after = validate(moved.assignment, new_weights_UxK) if moved.moved else before
    if moved.reseeded:  # the validation users' models are copied after this; not measured here
      after = (None, None)
    record.update(
      validation_before=before[0],
      validation_after=after[0],
      validation_var_before=before[1],
      validation_var_after=after[1],
    )
    if gate and after[0] is not None and after[0] > before[0]:
      logging.info(
        "%s round %d: reassignment would raise the validation per-user NLL from %.4f to %.4f; not taken",
        name,
        round_index,
        before[0],
        after[0],
      )
      record["taken"] = False
      (sizes_K,) = hosts.total(np.bincount(assignment_U, minlength=k))
      stay = Reassignment(assignment_U, 0.0, sizes_K, {}, np.arange(k))
      run.log.write(record)
      return assignment_U, weights_UxK, stay, scored
  run.log.write(record)
  logging.info(
    "%s round %d: %.2f%% of users moved; sizes %s%s",
    name,
    round_index,
    100 * moved.moved,
    moved.sizes.tolist(),
    ""
    if validate is None or after[0] is None
    else f"; validation per-user NLL {before[0]:.4f} before, {after[0]:.4f} after",
  )
  return moved.assignment, new_weights_UxK, moved, scored


def _move_users(run: FamilyRun, share_K, nll_KxU, nll_per_token_KxU, tokens_U, assignment_U):
  """The E-step's rule on the scores of a share of the users: every user to their lowest per-token NLL (hard), or,
  with --soft, weighted by the posterior over clusters with the clusters' shares `share_K` as prior; then the small
  clusters re-seeded. Returns (Reassignment, the new weights of these users, None unless --soft)."""
  k, min_size, groups = run.k, run.min_size, run.trainer.groups()
  new_weights_UxK = None
  if run.cfg.cluster.soft:
    log_joint_KxU = log_shares(share_K)[:, None] - nll_KxU
    moved = reassign(-log_joint_KxU / np.maximum(tokens_U, 1), assignment_U, min_size, groups)
    new_weights_UxK = np.exp(log_joint_KxU - logsumexp(log_joint_KxU, axis=0)).T
    # Users that re-seeding moved away from their most likely cluster belong to the new one alone.
    forced = np.flatnonzero(moved.assignment != np.argmax(new_weights_UxK, axis=1))
    new_weights_UxK[forced] = np.eye(k)[moved.assignment[forced]]
  else:
    moved = reassign(nll_per_token_KxU, assignment_U, min_size, groups)
  if moved.reseeded:
    logging.warning(
      "%s: re-seeded clusters %s by splitting %s (they fell below %d users)",
      run.name,
      sorted(moved.reseeded),
      sorted(set(moved.reseeded.values())),
      min_size,
    )
  return moved, new_weights_UxK


def _round_record(run: FamilyRun, round_index: int, moved: Reassignment, nll_per_token_KxR, tokens_R) -> dict:
  """metrics.jsonl's record of an E-step: users moved, cluster sizes, re-seeding, each cluster's history NLL
  (from every group's share of the users, `moved` and the scores being this group's)."""
  routed_R = tokens_R > 0
  own_R = nll_per_token_KxR[moved.assignment, np.arange(len(tokens_R))][routed_R]
  cluster_R = moved.assignment[routed_R]
  sum_K, count_K = run.trainer.groups().sum(
    np.bincount(cluster_R, weights=own_R, minlength=run.k), np.bincount(cluster_R, minlength=run.k)
  )
  return {
    "kind": "round",
    "model": run.name,
    "round": round_index,
    "moved": moved.moved,
    "routed_by": run.policy.route_part,
    "sizes": moved.sizes.tolist(),
    "reseeded": {str(a): b for a, b in moved.reseeded.items()},
    "history_nll_per_cluster": [float(sum_K[j] / count_K[j]) if count_K[j] else None for j in range(run.k)],
    "history_nll": float(sum_K.sum() / count_K.sum()) if count_K.sum() else None,
  }


def pull_toward_init(run: FamilyRun, rs: RoundState) -> None:
  """Once the rounds are over, a warm family's models are interpolated (--interpolate) or mixed (--mix_init)
  toward the LM they started from, weights by the validation users; saved at the same step."""
  if run.policy.interpolates and rs.at.alpha is None:
    params, record = interpolate(
      run.name, run.trainer, rs.state.params, run.validation, rs.assignment_U, rs.weights_UxK, run.log
    )
    rs.at.alpha, rs.at.alpha_shared = record["alpha"], record["alpha_shared"]
    rs.state, rs.best, rs.scored = rs.state.replace(params=params), None, None
    run.save(rs, replace=True)  # the same step: the interpolated parameters are the family's
  if run.policy.mixes and rs.at.mix is None:
    rs.at.mix = fit_mix(
      run.name, run.trainer, rs.state.params, run.validation, rs.assignment_U, rs.weights_UxK, run.log
    )["lam"]
    rs.scored = None
    run.save(rs, replace=True)  # the same step, now with the anchor and the weights


def _continuable(workdir: Path, source: str | None, cfg: Config, k: int, rounds: int) -> Checkpoints | None:
  """The checkpoints of family `source`, if it finished by the same rules, config, K and cap of `rounds`."""
  if source is None or not checkpoint_dir(workdir, source).exists():
    return None
  ckpts = Checkpoints(checkpoint_dir(workdir, source), cfg.train.keep_checkpoints)
  meta = ckpts.meta() if ckpts.latest_step() is not None else {}
  same = (
    meta.get("done")
    and not meta.get("in_round")
    and meta.get("k") == k
    and meta.get("rounds_cap") == rounds
    and meta.get("model") == dataclasses.asdict(cfg.model)
    and meta.get("train") == dataclasses.asdict(cfg.train)
    and meta.get("cluster_params") == cluster_spec(cfg, k)
  )
  if not same:
    ckpts.close()
    return None
  return ckpts


def warmed(cfg: Config, k: int) -> bool:
  """Whether HeTLM's K models start from a single LM trained first ('init_single')."""
  return k > 1 and cfg.cluster.init == "embedding" and cfg.cluster.warm_start


def init_lm(cfg: Config, seqs: UserSequences, workdir: Path, log: MetricsLog, validation: Validation | None) -> Trained:
  """The single LM HeTLM starts from ('init_single'): at most --init_rounds rounds from scratch, then annealed;
  trained once, then loaded from its checkpoints."""
  return train_family(
    "init_single",
    cfg,
    1,
    seqs,
    workdir,
    log,
    lambda: np.zeros(seqs.num_users, np.int32),
    cfg.cluster.init_rounds,
    validation,
  )


def initial_assignment(
  cfg: Config,
  k: int,
  seqs: UserSequences,
  vocab_size: int,
  workdir: Path,
  log: MetricsLog,
  validation: Validation | None,
  single=None,
):
  """The --init strategy as (assignment, warm-start params) thunks; 'embedding' first trains a single LM
  (init_lm, or the `single()` given) whose mean hidden states are clustered and, with --warm_start, copied."""
  c, seed = cfg.cluster, cfg.train.seed
  no_warm = lambda: None
  if k == 1:
    return (lambda: np.zeros(seqs.num_users, np.int32)), no_warm
  if c.init == "random":
    if cfg.data.split == "hash":  # from each user's id alone
      return (lambda: random_by_id(seqs.user_ids, k, seed)), no_warm
    return (lambda: random_balanced(seqs.num_users, k, seed)), no_warm
  if c.init == "features":
    return (lambda: interrupt.at_phase("kmeans") or kmeans_on_features(seqs, vocab_size, k, seed)), no_warm
  single = single or functools.lru_cache(maxsize=1)(lambda: init_lm(cfg, seqs, workdir, log, validation))

  def initial():
    lm = single()
    interrupt.at_phase("kmeans")
    return embedding_kmeans(lm.trainer, lm.params, seqs, k, seed, c.kmeans_users, by_id=cfg.data.split == "hash")

  return initial, ((lambda: single().params) if c.warm_start else no_warm)


def train_hetlm(
  cfg: Config,
  k: int,
  seqs: UserSequences,
  vocab_size: int,
  workdir: Path,
  log: MetricsLog,
  validation: Validation | None,
  name: str = "hetlm",
  on_round=None,
) -> Trained:
  """HeTLM with K cluster models from its initial assignment (K=1: a single LM). Warm-started, its rounds
  go on from the init LM by the warm rules of cluster/policy.py, and the result carries that LM."""
  single = functools.lru_cache(maxsize=1)(lambda: init_lm(cfg, seqs, workdir, log, validation))
  initial, warm = initial_assignment(cfg, k, seqs, vocab_size, workdir, log, validation, single)
  rounds = cfg.cluster.rounds if k > 1 else 1
  trained = train_family(
    name, cfg, k, seqs, workdir, log, initial, rounds, validation, on_round=on_round, warm_params=warm
  )
  if warmed(cfg, k):
    trained.init_lm = single()
  return trained


def train_single_ft(
  cfg: Config, seqs: UserSequences, workdir: Path, log: MetricsLog, validation: Validation | None, rounds: int
) -> Trained:
  """The K=1 control (`single_ft`): the init LM fine-tuned exactly as HeTLM's clusters are (same warm rules,
  `rounds` rounds at most, no E-step), so that HeTLM minus single_ft is what clustering adds."""
  zeros = lambda: np.zeros(seqs.num_users, np.int32)
  return train_family(
    "single_ft",
    cfg,
    1,
    seqs,
    workdir,
    log,
    zeros,
    rounds,
    validation,
    warm_params=lambda: init_lm(cfg, seqs, workdir, log, validation).params,
  )
