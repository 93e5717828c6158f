"""hetlm bench: one run, identical shapes and batches for every contender, medians over timed steps.

Contenders for the same K models: the stacked step (one jitted vmapped step), a Python loop of K jitted
single-model steps, and PyTorch (K eager models in a loop, and a torch.func ensemble). Also: MFU, the
scoring pass, data preparation, padding in a real round's batches and the time the step loop waits for the
input pipeline. See docs/BENCHMARKS.md for the figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from absl import logging

from hetlm_jax import interrupt
from hetlm_jax.bench import flops, torch_reference
from hetlm_jax.cluster.assign import kmeans_on_features, random_balanced
from hetlm_jax.config import Config, validate
from hetlm_jax.data.prepare import data_path, prepare_data
from hetlm_jax.data.readers import read_events
from hetlm_jax.data.tokenizer import UNK
from hetlm_jax.files import location, make_dir, replace_text
from hetlm_jax.model import param_count
from hetlm_jax.train.batches import ClusterBatches, ScoringBatches, add_by_user, scored_users
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.state import make_mesh
from hetlm_jax.train.step import packed_loss_mask, unrolled

WARMUP = 2  # untimed steps first (the first compiles)


def _real_tokens(batch) -> int:
  """Predicted tokens of a [K, B, T+1] batch (what the loss counts; padding and segment starts are not)."""
  return int(np.asarray(jax.vmap(packed_loss_mask)(batch[1])).sum())


def _median_step_s(step_fn, state, batches: list) -> tuple[float, float]:
  """Median seconds of the steps after WARMUP, each timed to its end on the device; and the compile seconds: the
  first step's time less that median (the persistent compilation cache is off in bench)."""
  times = []
  for batch in batches:
    start = time.perf_counter()
    state, metrics = step_fn(state, *batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = float(np.median(times[WARMUP:]))
  return median, max(times[0] - median, 0.0)


def _stacked_step_s(cfg: Config, k: int, batches: list, stack: str | None = None) -> tuple[float, float]:
  """(step seconds, compile seconds) of the K stacked models, --stack as configured or `stack`."""
  if stack is not None:
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, stack=stack))
  trainer = Trainer(cfg, k)
  state = trainer.start_round(trainer.init_state(), 10**6)
  on_device = [jax.device_put(b, trainer.train_step.batch_sharding) for b in batches]
  return _median_step_s(trainer.train_step, state, on_device)


def _loop_step_s(cfg: Config, k: int, batches: list) -> tuple[float, float]:
  """The same K models as K separate states, stepped by a Python loop of one jitted single-model step."""
  trainer = Trainer(cfg, 1)
  states = [trainer.start_round(trainer.init_state(), 10**6) for _ in range(k)]
  put = lambda b: [jax.device_put(tuple(a[c : c + 1] for a in b), trainer.train_step.batch_sharding) for c in range(k)]

  def loop_step(states, per_cluster):
    out = [trainer.train_step(states[c], *per_cluster[c]) for c in range(k)]
    return [s for s, _ in out], [m for _, m in out]

  return _median_step_s(lambda states, *b: loop_step(states, b), states, [tuple(put(b)) for b in batches])


def _throughput(cfg: Config, seqs, k: int, steps: int, with_torch: bool, peak: float) -> dict:
  """Tokens/s of the stacked step, the loop and PyTorch on the same `steps` timed batches; the stacked
  step's MFU against `peak` FLOP/s."""
  rounds = ClusterBatches(
    seqs, random_balanced(seqs.num_users, k, 0), k, cfg.train.batch_size, cfg.model.context, 10**4, cfg.train.seed, 0
  )
  batches = [rounds.batch(s % rounds.steps) for s in range(WARMUP + steps)]
  tokens = float(np.median([_real_tokens(b) for b in batches[WARMUP:]]))
  row = {
    "k": k,
    "d_model": cfg.model.d_model,
    "n_layers": cfg.model.n_layers,
    "batch": cfg.train.batch_size,
    "seq_len": cfg.model.context,
    "params_per_model": param_count(cfg.model),
    "real_tokens_per_step": tokens,
    "compute_dtype": cfg.model.compute_dtype,
  }
  row["vocab_size"] = cfg.model.vocab_size
  logging.info("bench: stacked step, K=%d, d_model=%d, vocabulary %d", k, cfg.model.d_model, cfg.model.vocab_size)
  row["stacked_step_s"], row["compile_s"] = {}, {}
  for stack in ("unroll", "vmap"):  # both ways of stacking: step time, and what each costs to compile
    row["stacked_step_s"][stack], row["compile_s"][stack] = _stacked_step_s(cfg, k, batches, stack)
  row["stack"] = "unroll" if unrolled(cfg, make_mesh(cfg, k), k) else "vmap"  # what --stack (auto: its rule) chose
  row["vmapped_step_s"] = row["stacked_step_s"][row["stack"]]
  logging.info("bench: loop of %d single-model steps", k)
  row["loop_step_s"], row["compile_s"]["loop"] = _loop_step_s(cfg, k, batches)
  row["vmapped_tokens_per_s"] = tokens / row["vmapped_step_s"]
  row["loop_tokens_per_s"] = tokens / row["loop_step_s"]
  row["vmapped_over_loop"] = row["vmapped_tokens_per_s"] / row["loop_tokens_per_s"]
  row.update(
    dict.fromkeys(("torch_loop_tokens_per_s", "torch_func_tokens_per_s", "torch_tokens_per_s", "vmapped_over_torch"))
  )
  missing = torch_reference.available()
  if with_torch and missing:
    logging.warning("bench: no PyTorch figures: %s", missing)
    row["torch_missing"] = missing
  elif with_torch:
    logging.info("bench: PyTorch, the same %d models (eager loop, torch.func ensemble)", k)
    measured = torch_reference.measure(cfg, k, batches, WARMUP)
    row.update({key: value for key, value in measured.items() if not key.endswith("_step_s")})
    for way in ("loop", "func"):
      row[f"torch_{way}_tokens_per_s"] = tokens / measured[f"torch_{way}_step_s"]
    row["torch_tokens_per_s"] = max(row["torch_loop_tokens_per_s"], row["torch_func_tokens_per_s"])
    row["vmapped_over_torch"] = row["vmapped_tokens_per_s"] / row["torch_tokens_per_s"]
  row["model_flops_per_token"] = flops.model_flops_per_token(cfg.model)
  row["mfu"] = row["model_flops_per_token"] * row["vmapped_tokens_per_s"] / peak
  return row


def score_host_seconds(seqs, width: int, batch_rows: int, k: int, d_model: int) -> dict:
  """Host seconds of a scoring pass with no device work: laying the windows into batches, cutting out each batch
  and finding the users it scores (the E-step), and adding a batch's hidden states to its users' sums (the
  k-means initialisation's embedding, with zeros for the states). Per batch this is O(batch rows)."""
  start = time.perf_counter()
  batches = ScoringBatches(seqs, "history", width, batch_rows)
  tokens_U = np.zeros(seqs.num_users, np.int64)
  for i in range(batches.num_batches):
    _, _, mask, owner = batches.batch(i)
    users_R, _, count_R = scored_users(mask, owner)
    tokens_U[users_R] += count_R
  score_s = time.perf_counter() - start
  start = time.perf_counter()
  sums_UxKD = np.zeros((seqs.num_users, k * d_model))
  for i in range(batches.num_batches):
    owner_N = batches.batch(i)[3].ravel()
    owner_N = owner_N[owner_N >= 0]
    add_by_user(sums_UxKD, owner_N, np.zeros((len(owner_N), k * d_model)))
  return {
    "score_host_s_per_million_users": 1e6 * score_s / max(seqs.num_users, 1),
    "embed_host_s_per_million_users": 1e6 * (time.perf_counter() - start) / max(seqs.num_users, 1),
    "score_batches": batches.num_batches,
  }


def _scoring(cfg: Config, seqs, k: int) -> dict:
  trainer = Trainer(cfg, k)
  params = trainer.init_state().params
  start = time.perf_counter()
  trainer.score(params, seqs.subset(np.arange(min(seqs.num_users, 64))), "history")  # compiles: one batch
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  _, tokens_U = trainer.score(params, seqs, "history")
  seconds = time.perf_counter() - start
  return {
    "score_users_per_s": seqs.num_users / seconds,
    "score_tokens_per_s": float(tokens_U.sum()) / seconds,
    "score_user_model_pairs_per_s": k * seqs.num_users / seconds,
    "score_compile_s": compile_s,
    **score_host_seconds(seqs, cfg.model.context + 1, cfg.train.eval_batch_size, k, cfg.model.d_model),
  }


def _predict(cfg: Config, prepared, k: int) -> dict:
  """`next_pages` for the training users of the data (from their events: sequences built, routed, posterior, top
  10 pages of the routed model; their whole log is the history) against the evaluation's path for the same users
  (routing by history, then ranking the held-out page, on sequences already built), both after a compiling
  warm-up; initialised parameters (speed does not depend on them)."""
  from hetlm_jax.eval.evaluate import EvalOptions, LMFamily, rank_next_pages, route_by_history
  from hetlm_jax.predict import Predictor
  from hetlm_jax.workdir import TrainedRun

  trainer = Trainer(cfg, k)
  params = trainer.init_state().params
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  assignment = random_balanced(seqs.num_users, k, 0)
  predictor = Predictor(Path(os.devnull), TrainedRun(cfg, tokenizer, params, assignment, 0), jax.devices())
  predictor.label = None
  table = read_events(data_path(cfg), cfg.data.format, max_users=cfg.data.max_users or None)
  table = table.filter(pc.is_in(table["user_id"], value_set=pa.array(seqs.user_ids.astype(str))))  # the same users

  def predict(events):
    view, _ = predictor.events_view(events)
    cluster_U, log_post_KxU, _, tokens_U, _ = predictor.route_users(view, view.user_ids)
    predictor.top_pages(view, cluster_U, log_post_KxU, 10, mixture=False)
    return view.num_users, int(tokens_U.sum())

  family = LMFamily("bench", trainer, params, assignment)

  def evaluate(users):
    view = seqs.subset(users)
    family.assignment = route_by_history(family, view)
    rank_next_pages(
      lambda u: trainer.next_logprobs(params, view, u, family.assignment[u]),
      view,
      tokenizer,
      EvalOptions(),
      trainer.eval_batch,
      "bench",
      groups_U=family.assignment,
    )

  predict(table.slice(0, 2000))  # compiles
  evaluate(np.arange(min(seqs.num_users, 256)))
  start = time.perf_counter()
  users, tokens = predict(table)
  predict_s = time.perf_counter() - start
  start = time.perf_counter()
  evaluate(np.arange(seqs.num_users))
  eval_s = time.perf_counter() - start
  return {
    "predict_users_per_s": users / predict_s,
    "predict_tokens_per_s": tokens / predict_s,
    "eval_path_users_per_s": seqs.num_users / eval_s,
  }


def _real_round(cfg: Config, seqs, vocab_size: int, k: int, steps: int) -> dict:
  """A round as training runs it, on a k-means assignment (clusters of unequal size): the padding share of
  its batches, with and without --balance, and the share of step time spent waiting for the next batch."""
  assignment = kmeans_on_features(seqs, vocab_size, k, cfg.train.seed)
  make = lambda balance: ClusterBatches(
    seqs, assignment, k, cfg.train.batch_size, cfg.model.context, cfg.train.epochs, cfg.train.seed, 0, balance=balance
  )
  batches = make(cfg.train.balance)
  trainer = Trainer(cfg, k)
  state = trainer.start_round(trainer.init_state(), batches.steps)
  state = trainer.train_round(state, batches, until=min(WARMUP, batches.steps))  # compile
  trainer.host_wait_s = 0.0
  start = time.perf_counter()
  until = min(WARMUP + steps, batches.steps)
  state = trainer.train_round(state, batches, until=until)
  jax.block_until_ready(state.params)
  wall = time.perf_counter() - start
  tokens = sum(_real_tokens(batches.batch(s)) for s in range(WARMUP, until))
  return {
    "cluster_sizes": np.bincount(assignment, minlength=k).tolist(),
    "padding_fraction": batches.padding_fraction(),
    "padding_fraction_unbalanced": make(False).padding_fraction(),
    "host_wait_fraction": trainer.host_wait_s / wall,
    "round_steps_timed": until - WARMUP,
    "round_tokens_per_s": tokens / wall,
  }


def run_bench(
  cfg: Config, out: str | None, steps: int = 20, k: int = 8, sweep: list[tuple[int, ...]] = (), with_torch: bool = True
) -> dict:
  """Measures on the configured data (default: the packaged sample); writes JSON to `out` if given.
  `sweep`: (d_model, K) or (d_model, K, vocabulary) sizes, one row each in `sweep` (d_ff = 4 d_model, head width
  64 from d_model 256; the data's vocabulary unless given: pages beyond a smaller one become <unk>)."""
  validate(cfg)
  prepared = prepare_data(cfg)
  seqs, vocab = prepared.seqs, prepared.tokenizer.vocab_size
  cfg = cfg.built(vocab)
  device = jax.devices()[0]
  peak, peak_source = flops.peak_flops(device)
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "device": f"{device.platform}: {device.device_kind}",
    "devices": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "jax_version": jax.__version__,
    "users": seqs.num_users,
    "model": dataclasses.asdict(cfg.model),
    "peak_flops": peak,
    "peak_source": peak_source,
    "prep_events_per_s": prepared.stats["events"] / max(prepared.seconds, 1e-9),
  }
  unwritten = f"{out} was not written" if out else "nothing was written"
  result.update(_throughput(cfg, seqs, k, steps, with_torch, peak))
  interrupt.safe_point("after the throughput measurements", unwritten)
  logging.info("bench: scoring pass, K=%d", k)
  result.update(_scoring(cfg, seqs, k))
  logging.info("bench: next pages for every user (the Predictor), and the evaluation's path, K=%d", k)
  result.update(_predict(cfg, prepared, k))
  interrupt.safe_point("after the scoring and prediction measurements", unwritten)
  logging.info("bench: a real round's input pipeline, K=%d", k)
  result.update(_real_round(cfg, seqs, vocab, k, steps))
  result["sweep"] = []
  _write(out, result)  # and again after each sweep row: a sweep cut short keeps what it measured
  for i, (d_model, sweep_k, *size) in enumerate(sweep):
    interrupt.safe_point(
      f"after {i} of {len(sweep)} sweep rows", f"{out} holds what was measured before" if out else "nothing was written"
    )
    v = size[0] if size else vocab
    model = dataclasses.replace(
      cfg.model, d_model=d_model, d_ff=4 * d_model, n_heads=max(4, d_model // 64), vocab_size=v
    )
    ids = np.arange(vocab)
    row_seqs = seqs if v >= vocab else seqs.map_tokens(np.where(ids < v, ids, UNK))
    result["sweep"].append(_throughput(cfg.replace(model=model), row_seqs, sweep_k, steps, with_torch, peak))
    _write(out, result)
  _log(result)
  return result


def _write(out: str | None, result: dict) -> None:
  if out:
    make_dir(location(out, "--out").parent)
    replace_text(out, json.dumps(result, indent=2) + "\n")


def _log(result: dict) -> None:
  fmt = lambda x: "n/a" if x is None else f"{x:,.0f}"
  for row in [result, *result["sweep"]]:
    logging.info(
      "K=%d d_model=%d: stacked %s tokens/s, loop %s, PyTorch %s (loop %s, torch.func %s), MFU %.2f%%",
      row["k"],
      row["d_model"],
      fmt(row["vmapped_tokens_per_s"]),
      fmt(row["loop_tokens_per_s"]),
      fmt(row["torch_tokens_per_s"]),
      fmt(row["torch_loop_tokens_per_s"]),
      fmt(row["torch_func_tokens_per_s"]),
      100 * row["mfu"],
    )
    c, s = row["compile_s"], row["stacked_step_s"]
    logging.info(
      "K=%d vocabulary %d: compile unrolled %.1fs (step %.3fs), vmapped %.1fs (step %.3fs), loop's step %.1fs",
      row["k"],
      row["vocab_size"],
      c["unroll"],
      s["unroll"],
      c["vmap"],
      s["vmap"],
      c["loop"],
    )
  logging.info(
    "next pages %s users/s (%s history tokens/s); the evaluation's path %s users/s",
    fmt(result["predict_users_per_s"]),
    fmt(result["predict_tokens_per_s"]),
    fmt(result["eval_path_users_per_s"]),
  )
  logging.info(
    "scoring %s users/s, %s tokens/s; padding %.1f%% (unbalanced %.1f%%); host wait %.1f%% of step time",
    fmt(result["score_users_per_s"]),
    fmt(result["score_tokens_per_s"]),
    100 * result["padding_fraction"],
    100 * result["padding_fraction_unbalanced"],
    100 * result["host_wait_fraction"],
  )
