"""Training the LLM baseline by the page LMs' rules: the same windows of the training users' histories (as text),
passes capped as a page LM's round is, validation on the same validation users' held-out targets, early stopping
on the per-user mean validation NLL with the same --patience, the best validated weights kept.

A model from scratch follows a round from scratch (--epochs passes, validated every pass, patience counted once half
of them is trained); a pretrained model follows a warm-started round (--warm_epochs passes, validated every
--val_every of a pass). The state (weights a fine-tune changes, optimizer, schedule, position, best so far) is saved
at every validation, and when a stop is asked for (SIGTERM, Ctrl-C) after the step in progress: the same command
goes on from there.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import time

import numpy as np
from absl import logging

from hetlm_jax import interrupt
from hetlm_jax.config import Config
from hetlm_jax.data.sequences import UserSequences, all_windows
from hetlm_jax.files import location, make_dir, written
from hetlm_jax.llm.model import LLM, load_trainable, trainable_state
from hetlm_jax.llm.score import padded, subword_logprobs, target_nll, texts_of
from hetlm_jax.llm.text import PageSubwords
from hetlm_jax.train.metrics import Progress

_KEPT = "the LLM's fine-tune is saved after its last step; the same command goes on from there"


@dataclasses.dataclass(frozen=True)
class Budget:
  """Passes at most, validations every `every` passes, and patience counted from pass `patience_from`."""

  passes: float
  every: float
  patience: int
  patience_from: float

  @classmethod
  def of(cls, cfg: Config, scratch: bool) -> Budget:
    t = cfg.train
    if scratch:  # a round from scratch
      return cls(t.epochs, 1.0, t.patience, t.epochs / 2)
    return cls(t.warm_epochs, t.val_every, t.patience, 0.0)  # a warm-started round


def learning_rate(cfg: Config, finetune: str, scratch: bool) -> float:
  """--llm_learning_rate, or by the kind of training when it is 0."""
  if cfg.llm.llm_learning_rate:
    return cfg.llm.llm_learning_rate
  return cfg.train.learning_rate if scratch else (2e-4 if finetune == "lora" else 5e-5)


def validation_nll(llm: LLM, seqs: UserSequences, width: int, subwords: PageSubwords) -> float:
  """The per-user mean of the validation users' NLL per held-out target token: the page LMs' statistic."""
  nll_U, tokens_U, _ = target_nll(llm, seqs, width, subwords)
  per_user = nll_U[tokens_U > 0] / tokens_U[tokens_U > 0]
  return float(per_user.mean()) if len(per_user) else math.nan


def fine_tune(llm: LLM, cfg: Config, train: UserSequences, validation, subwords: PageSubwords, path, log) -> dict:
  """Trains the LLM's trainable weights (all, or LoRA's) on `train`'s history windows, stopped by `validation`'s
  users (a cluster.validation.Validation, or None: every pass is trained); resumes from `path` (train.pt) when it
  is there. Leaves the best validated weights in the model; returns the record eval.json keeps."""
  import torch

  scratch = llm.spec == "scratch"
  budget = Budget.of(cfg, scratch)
  width = cfg.model.context + 1
  seed = cfg.train.seed
  owner_W, start_W, length_W, scored_W = all_windows(train, "history", width)  # the page LMs' training windows
  n_windows = len(owner_W)
  shuffled = functools.lru_cache(maxsize=1)(lambda epoch: np.random.default_rng([seed, epoch]).permutation(n_windows))
  per_pass = -(-n_windows // cfg.llm.llm_batch_size)
  total = max(1, round(budget.passes * per_pass))
  every = max(1, round(budget.every * per_pass))
  params = [p for p in llm.model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
    params, lr=learning_rate(cfg, cfg.llm.finetune(), scratch), weight_decay=cfg.train.weight_decay
  )
  warmup = int(cfg.train.warmup_frac * total)
  shape = lambda s: (
    (s + 1) / max(warmup, 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1)))
  )
  schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
  state = {
    "tokenizer": llm.tokenizer_json,
    "step": 0,
    "best": math.inf,
    "bad": 0,
    "best_state": None,
    "tokens": 0,
    "seconds": 0.0,
    "curve": [],
    "stopped_early": False,
  }
  path = location(path)
  if path.exists():
    saved = torch.load(io.BytesIO(path.read_bytes()), weights_only=False)
    load_trainable(llm, saved.pop("weights"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    schedule.load_state_dict(saved.pop("schedule"))
    torch.set_rng_state(saved.pop("rng"))  # dropout goes on as it would have
    state.update(saved)
    logging.info("LLM %s: going on from step %d of %d", llm.spec, state["step"], total)

  def save(done: bool = False) -> None:
    content = {
      **state,
      "rng": torch.get_rng_state(),
      "done": done,
      "weights": trainable_state(llm),
      "optimizer": optimizer.state_dict(),
      "schedule": schedule.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(content, buffer)
    make_dir(path.parent)
    with written(path) as tmp:
      tmp.write_bytes(buffer.getvalue())

  def validate(step: int) -> bool:
    """Records the validation NLL at `step`; whether to stop early."""
    if validation is None:
      return False
    interrupt.at_phase("llm_validation")
    nll = validation_nll(llm, validation.seqs, width, subwords)
    state["curve"].append([step, nll])
    log.write({"kind": "llm_validation", "model": llm.spec, "step": step, "passes": step / per_pass, "nll": nll})
    if nll < state["best"]:
      state["best"], state["bad"], state["best_state"] = nll, 0, trainable_state(llm)
    elif step / per_pass >= budget.patience_from:
      state["bad"] += 1
    return bool(budget.patience) and state["bad"] >= budget.patience

  progress = Progress(
    total, f"LLM {llm.spec} ({cfg.llm.finetune()})", every=max(cfg.train.log_every, 1), initial=state["step"]
  )
  begun = time.perf_counter() - state["seconds"]
  llm.model.train()
  while state["step"] < total and not state["stopped_early"]:
    step = state["step"]
    epoch, at = divmod(step, per_pass)
    batch = shuffled(epoch)[at * cfg.llm.llm_batch_size : (at + 1) * cfg.llm.llm_batch_size]  # drawn once a pass
    texts = texts_of(train, subwords, batch, start_W, length_W, scored_W)
    ids, mask = padded(llm, texts)
    scored = torch.zeros_like(ids, dtype=torch.float32)
    for b, (_, spans) in enumerate(texts):
      for lo, hi in spans:
        scored[b, lo:hi] = 1
    loss = -(subword_logprobs(llm, ids, mask) * scored).sum() / scored.sum().clamp(min=1)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    optimizer.step()
    schedule.step()
    state["step"] = step + 1
    state["tokens"] += int(mask.sum())
    state["seconds"] = time.perf_counter() - begun
    progress.update(state["step"], f"loss {loss.item():.3f}")
    if state["step"] % cfg.train.log_every == 0:
      log.write({"kind": "llm_train", "model": llm.spec, "step": state["step"], "loss": float(loss.item())})
    if state["step"] % every == 0 or state["step"] == total:
      llm.model.eval()
      state["stopped_early"] = validate(state["step"]) and state["step"] < total  # patience ran out before the cap
      llm.model.train()
      save()
    try:
      interrupt.safe_point(f"training the LLM, after step {state['step']}", _KEPT)
    except interrupt.Stopped:
      save()
      raise
  progress.close()
  llm.model.eval()
  if state["best_state"] is not None:
    load_trainable(llm, state["best_state"])
  state["record"] = {
    "finetune": cfg.llm.finetune(),
    "steps": state["step"],
    "passes": round(state["step"] / per_pass, 2),
    "tokens_trained": state["tokens"],
    "train_s": state["seconds"],
    "best_validation_nll": None if math.isinf(state["best"]) else state["best"],
    "stopped_early": bool(state["stopped_early"]),
  }
  save(done=True)
  return state["record"]
