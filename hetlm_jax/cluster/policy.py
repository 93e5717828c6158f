"""The round policy: how a round is scheduled, when it stops, what it is compared with, and when users are
routed. cluster/rounds.py runs the rounds and keeps their checkpoints exact; every choice is made here, on a
family's run position (Position).

Three kinds of round:
- cold: a model trained from scratch, or restarted at the full rate: warmup then cosine decay over at most
  --epochs passes, validated after every pass, patience counted once half of them are trained.
- anneal: the last round of a family trained cold, from its kept pass: no warmup, the rate starts where
  that pass had it and decays over at most --warm_epochs passes, so the LM ends annealed, not at a lucky
  noisy pass near its peak rate. Skipped when the kept pass was already near the end of its decay.
- warm: a family that goes on from a trained LM (HeTLM's clusters, single_ft): no warmup, the rate starts at
  --warm_lr_scale x --learning_rate and decays within --warm_epochs passes, validated every --val_every
  passes; no minimum before patience counts.

The statistic every decision reads is the validation users' per-user mean NLL (Validation.stats), the
quantity the claim is about; its variance over users is logged beside it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hetlm_jax.config import Config
from hetlm_jax.train.state import cold_lr, decay_lr, schedule_lr

# An anneal is skipped when the kept pass's rate is within this factor of the end of a cold decay.
_ANNEALED = 1.5


@dataclasses.dataclass
class Position:
  """Where a model family's training stands: saved as every checkpoint's meta, so a resumed run goes on from
  exactly there."""

  round: int = 0  # rounds finished
  done: bool = False  # no round follows (the interpolation or mixture toward the init LM may)
  in_round: bool = False  # a round has started and not ended
  passes: float = 0.0  # passes over every user trained, over all rounds
  tokens: float = 0.0  # real tokens trained on, over all rounds (a token repeated by --balance counts each time)
  cold_done: bool = False  # the rounds from scratch are over (an anneal may follow)
  kept_lr: float = 0.0  # the learning rate at the last kept validation (where an anneal starts)
  converged: bool = False  # a round found nothing better than its start, or an E-step moved < --tolerance
  annealed: bool = False
  warm: bool = False  # the family started from a trained LM
  improved: bool = False  # some round found a point better than its start
  best_check: int = 0  # the current round's validation with the lowest NLL so far (0: the round's start)
  best_nll: float | None = None  # its per-user mean validation NLL, and the variance beside it
  best_var: float | None = None
  train_s: float = 0.0  # seconds trained, over every session of the run
  alpha: list[float] | None = None  # --interpolate's weights (per cluster, and the shared part's), once fitted
  alpha_shared: float | None = None
  mix: list[float] | None = None  # --mix_init's weights, once fitted

  def to_meta(self) -> dict:
    """The checkpoint's meta (a weight not fitted yet is left out)."""
    return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

  @classmethod
  def from_meta(cls, meta: dict) -> Position:
    """The position a checkpoint's meta holds (its other keys describe the family, not its progress)."""
    known = {f.name for f in dataclasses.fields(cls)}
    # A checkpoint from before `improved` was recorded: assumed true, so HeTLM is not called its init LM unseen.
    return cls(**{"improved": True, **{key: value for key, value in meta.items() if key in known}})

  def kept_its_start(self) -> bool:
    """Whether a warm-started family ended where it started: no round found a better point, or the weights
    toward the LM it started from were fitted all the way back to it."""
    back = (
      self.alpha is not None
      and not any(self.alpha)
      and not self.alpha_shared
      or self.mix is not None
      and not any(self.mix)
    )
    return self.warm and self.round > 0 and (back or not self.improved)

  def same_model_groups(self, k: int) -> list[list[int]]:
    """Clusters that are one model, by construction: every cluster of a family that kept its start; those whose
    --interpolate weight was fitted to 0 (each is the init LM's cluster part with the one shared part); those whose
    --mix_init weight is 0 (each predicts as the init LM). Groups of two or more."""
    if self.warm and self.kept_its_start():
      return [list(range(k))] if k > 1 else []
    groups = [[c for c, w in enumerate(weights) if w == 0] for weights in (self.alpha, self.mix) if weights is not None]
    return [g for g in groups if len(g) > 1]

  def clusters_as_init(self, k: int, has_shared: bool) -> list[int]:
    """The clusters whose model is the LM the family started from: all when it kept its start; else those whose
    --interpolate weight is 0 (with the shared part's 0 too, or no shared part), or whose --mix_init weight is 0."""
    if self.warm and self.kept_its_start():
      return list(range(k))
    out = set()
    if self.alpha is not None and (not has_shared or not self.alpha_shared):
      out |= {c for c, w in enumerate(self.alpha) if w == 0}
    if self.mix is not None:
      out |= {c for c, w in enumerate(self.mix) if w == 0}
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """One round's schedule and stopping rule, as the policy plans it."""

  kind: str  # cold | anneal | warm
  passes: int  # at most
  round_lr: np.ndarray  # (start, peak, end) of the round's schedule
  val_every: float  # passes between validations
  patience: int  # validations without a better one that stop the round (0: none)
  min_checks: int  # validations before patience counts

  def check_steps(self, steps_per_epoch: int) -> int:
    """Steps between two validations."""
    return max(1, int(round(self.val_every * steps_per_epoch)))

  def checks(self, steps_per_epoch: int) -> int:
    """Validations in a round that runs to its cap (the last at its last step)."""
    return -(-self.passes * steps_per_epoch // self.check_steps(steps_per_epoch))

  def stalled(self, check: int, best_check: int) -> bool:
    """Whether `patience` validations since the best one, `best_check`, stop the round at validation `check`."""
    return bool(self.patience) and check >= self.min_checks and check - best_check >= self.patience


@dataclasses.dataclass(frozen=True)
class Policy:
  """The rules of one model family. `warm`: it starts from a trained LM; `validating`: validation users exist
  (without them every round trains its whole cap and ends at the bottom of its decay, so nothing anneals)."""

  cfg: Config
  k: int
  warm: bool
  validating: bool

  @property
  def patience(self) -> int:
    """Validations without a better one that stop a round (0 without validation users)."""
    return self.cfg.train.patience if self.validating else 0

  @property
  def prox(self) -> float:
    """--prox for a warm family, else 0."""
    return self.cfg.cluster.prox if self.warm else 0.0

  @property
  def interpolates(self) -> bool:
    """--interpolate: a warm family's models end interpolated toward the LM they started from (needs validation
    users to fit the weights)."""
    return self.cfg.cluster.interpolate and self.warm and self.validating

  @property
  def mixes(self) -> bool:
    """--mix_init: a warm family's models end mixed in prediction space with the LM they started from (needs
    validation users to fit the weights)."""
    return self.cfg.cluster.mix_init and self.warm and self.validating

  @property
  def route_part(self) -> str:
    """The part of every user's sequence the E-step scores: the routing tail (see data.routing_split) or the
    whole history."""
    return "target" if self.cfg.cluster.route_frac else "history"

  def first_position(self) -> Position:
    """A family's run position before its first round."""
    return Position(cold_done=self.warm, kept_lr=float(cold_lr(self.cfg.train)[1]), warm=self.warm)

  def plan(self, at: Position) -> RoundPlan:
    """The next round of a family at run position `at`."""
    t = self.cfg.train
    if self.warm:
      return RoundPlan(
        "warm", t.warm_epochs, decay_lr(self.cfg.cluster.warm_lr_scale * t.learning_rate), t.val_every, self.patience, 0
      )
    if not at.cold_done:
      return RoundPlan("cold", t.epochs, cold_lr(t), 1.0, self.patience, -(-t.epochs // 2))
    return RoundPlan("anneal", t.warm_epochs, decay_lr(at.kept_lr), t.val_every, self.patience, 0)

  def kept_lr(self, plan: RoundPlan, check: int, steps_per_epoch: int) -> float:
    """The learning rate at validation `check` of a round (the rate of the parameters kept there)."""
    total = plan.passes * steps_per_epoch
    fraction = min(check * plan.check_steps(steps_per_epoch), total) / total
    return float(schedule_lr(self.cfg.train.warmup_frac, fraction, plan.round_lr))

  def runs_estep(self, plan: RoundPlan, at: Position, improved: bool) -> bool:
    """K > 1: a round ends in an E-step when it improved on its start, and the family's first round always
    does (whatever the gate says), so a failed first round still says what reassignment would do. An anneal
    only finishes the models of the last assignment."""
    return self.k > 1 and plan.kind != "anneal" and (improved or at.round == 1)

  def end_round(self, plan: RoundPlan, at: Position, improved: bool, rounds: int, moved: float | None) -> None:
    """Updates the run position after round at.round (already counted) and its E-step, if any (`moved`: the
    share of users it moved): done, converged, cold_done."""
    if plan.kind == "anneal":
      at.done = at.annealed = True
      return
    # A round that found nothing better than its start: another restart of the same schedule is not worth
    # training (after a forced first E-step, one more round tries the new assignment). Nor is one after an
    # E-step that moved fewer than --tolerance of the users.
    converged = (not improved and not (self.k > 1 and at.round == 1)) or (
      moved is not None and moved < self.cfg.cluster.tolerance
    )
    at.converged = bool(at.converged or converged)
    finished = at.converged or at.round >= rounds
    if plan.kind == "warm":
      at.done = finished
      return
    if finished:
      at.cold_done = True
      anneal = self.validating and at.kept_lr > _ANNEALED * cold_lr(self.cfg.train)[2]
      at.done = not anneal
