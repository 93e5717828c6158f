"""The commands that run a whole job, each a short list of named stages, callable without a command line.

`hetlm train` (train_and_evaluate): check the inputs and prepare the data → start the run's files → train HeTLM
(K stacked models, reassignment rounds) → train the single-LM baselines by the same rules → evaluate every
model on each user's held-out target. `hetlm evaluate` (evaluate_workdir) and `hetlm generate`
(generate_for_user) read a trained run (workdir.py) and its data, or new data.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
from absl import logging

from hetlm_jax import hosts, interrupt
from hetlm_jax.cluster import tuning as tuning_grids
from hetlm_jax.cluster.assign import cluster_shares
from hetlm_jax.cluster.rounds import Trained, train_family, train_hetlm, train_single_ft, warmed
from hetlm_jax.cluster.validation import Validation, validation_slice
from hetlm_jax.config import Config, LLMConfig, validate
from hetlm_jax.data.prepare import Prepared, data_path, prepare_data
from hetlm_jax.data.sequences import UserSequences, routing_split, session_length_from_data
from hetlm_jax.data.tokenizer import BOS, EOS
from hetlm_jax.errors import HetlmError
from hetlm_jax.eval.evaluate import LM_NAMES, EvalOptions, LMFamily, evaluate, route_by_history
from hetlm_jax.eval.generate import Sampling, generate
from hetlm_jax.eval.new_users import evaluate_new_users
from hetlm_jax.files import location
from hetlm_jax.lock import hold
from hetlm_jax.model import matched_config, param_count
from hetlm_jax.train.metrics import MetricsLog, tensorboard_available
from hetlm_jax.train.split import num_models, part_sizes
from hetlm_jax.train.state import make_mesh
from hetlm_jax.workdir import (
  SavedAssignment,
  check_resumable,
  check_workdir,
  family_name,
  load_run,
  open_metrics,
  read_prepared,
  record_k_auto,
  run_data,
  saved_tokenizer,
  training_provenance,
  write_assignments,
  write_prepared,
  write_run_files,
)

# -- hetlm train -----------------------------------------------------------------------------------------------


def train_and_evaluate(cfg: Config, workdir: str | Path) -> dict:
  """Trains (or resumes) the run in `workdir`, writes eval.json and returns it; validates everything first, then
  holds the workdir (lock.py) until it returns."""
  with interrupt.stop_handler(), contextlib.ExitStack() as held:
    return _train_and_evaluate(cfg, location(workdir), held)


def _train_and_evaluate(cfg: Config, workdir: Path, held: contextlib.ExitStack) -> dict:
  """The stages of `hetlm train`, in order."""
  cfg, prepared = checked_inputs(cfg, workdir)
  seqs, validation, evaluated_U = validation_slice(cfg, prepared)
  check_validation_users(cfg, prepared.seqs, validation)
  hold(held, workdir, "train")  # before anything is written; a second run on this workdir is refused here
  log = start_run(cfg, workdir, prepared, seqs)
  held.callback(log.close)  # on a stop or an error too: on an object store, the records not yet written
  # Every model trains on the same tokens; with --route_frac, each history's tail is kept out to route users.
  train_seqs = routing_split(seqs, cfg.cluster.route_frac) if cfg.cluster.route_frac else seqs
  on_round = lambda assignment_U: write_assignments(workdir, seqs, assignment_U, prepared.int_user_ids)
  hetlm, ft_cfg, k_curve, tuning = train_hetlm_stage(cfg, train_seqs, workdir, log, validation, on_round)
  parts = hetlm_parameters(cfg, hetlm)
  models, params = train_baselines(ft_cfg, hetlm, parts, train_seqs, workdir, log, validation, tuning)
  extra = training_record(cfg, models, params, parts, validation, k_curve, tuning)
  llms = train_llm(cfg, prepared, train_seqs, validation, workdir, log)
  return evaluate_stage(models, prepared, seqs, evaluated_U, workdir, log, extra, llms)


def checked_inputs(cfg: Config, workdir: Path) -> tuple[Config, Prepared]:
  """Every check before anything is written (flags, workdir, resumability, the data, the mesh); returns the config
  the models are built from (Config.built) and the prepared data."""
  validate(cfg)
  check_workdir(workdir)
  if cfg.train.tensorboard and tensorboard_available():
    raise HetlmError(tensorboard_available())
  check_resumable(workdir, cfg)
  prepared = read_prepared(workdir, cfg) or prepare_data(cfg, saved_tokenizer(workdir))
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  if hosts.own_users():  # each holds its own users; the vocabulary must be one
    pages = np.frombuffer("\n".join(tokenizer.tokens).encode(), np.uint8)
    hosts.check_same(f"{data_path(cfg)}: the pages of the vocabulary", pages, np.array([tokenizer.vocab_size]))
  else:
    hosts.check_same(
      f"{data_path(cfg)}: the data read (users, tokens, pages)",
      seqs.tokens,
      seqs.offsets,
      seqs.split,
      np.array([tokenizer.vocab_size]),
    )
  ks = [cfg.cluster.k] if cfg.cluster.k else cfg.cluster.candidates()
  (users,) = hosts.total(np.array(seqs.num_users))
  if max(ks) > users:
    raise HetlmError(f"--k={max(ks)} is more than the {int(users)} usable users in {data_path(cfg)}")
  if hosts.own_users() and cfg.train.data_shards != hosts.share()[1]:
    raise HetlmError(
      f"--own_users: --data_shards={cfg.train.data_shards} must be the number of processes, {hosts.share()[1]}, so "
      "each process fills its rows of every batch from its own users"
    )
  cfg = cfg.built(tokenizer.vocab_size)
  check_llm(cfg)
  for k in ks:  # checks the mesh against the flags before anything is written
    make_mesh(cfg, k)
  return cfg, prepared


def check_llm(cfg: Config) -> None:
  """--llm: its libraries, its model's config and --llm_pages, before anything is trained (one line otherwise)."""
  if not cfg.llm.llm:
    return
  if hosts.share()[1] > 1:
    raise HetlmError("--llm is scored in PyTorch by one process: run the job as one process (or leave --llm out)")
  from hetlm_jax.llm.baseline import page_names
  from hetlm_jax.llm.model import check

  check(cfg.llm.llm, cfg.llm.finetune())
  page_names(cfg.llm.llm_pages)


def check_validation_users(cfg: Config, seqs: UserSequences, validation: Validation | None) -> None:
  """Refuses settings that choose on validation users when there are none; warns that early stopping is off."""
  if validation is not None:
    return
  for asked, flag in (
    (not cfg.cluster.k, "--k=auto chooses K"),
    (cfg.cluster.tune_baselines, "--tune_baselines chooses"),
  ):
    if asked:
      raise HetlmError(
        f"{data_path(cfg)}: --val_frac={cfg.train.val_frac} draws no validation user among "
        f"{seqs.num_users:,} users, and {flag} on them: raise --val_frac"
      )
  if cfg.train.patience:
    logging.warning(
      "--val_frac=%s draws no validation user among %s users: early stopping is off, and every "
      "round trains --epochs=%d passes",
      cfg.train.val_frac,
      f"{seqs.num_users:,}",
      cfg.train.epochs,
    )


def start_run(cfg: Config, workdir: Path, prepared: Prepared, trained: UserSequences) -> MetricsLog:
  """Writes the run's config, tokenizer and sessions files, opens metrics.jsonl and records the start (`trained`:
  the users whose histories train)."""
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  write_run_files(workdir, cfg, tokenizer, seqs)  # process 0 writes the run's files; orbax saves collectively
  hosts.barrier("workdir ready")
  if not prepared.saved:  # a resumed run read them from there
    write_prepared(workdir, cfg, prepared)
  log = open_metrics(workdir, cfg.train.tensorboard)
  hosts.barrier("metrics read")  # every process starts from the same records
  events = prepared.stats.get("events", 0)
  # with --own_users, every process's users
  users, train_users, train_tokens = (
    int(x)
    for x in hosts.total(
      np.array(seqs.num_users), np.array(trained.num_users), np.array((trained.split - trained.offsets[:-1]).sum())
    )
  )
  logging.info(
    "data: %s users (%s dropped as too short), %s events, vocab %d, prepared in %.1fs (%.0f events/s)",
    f"{users:,}",
    f"{prepared.stats.get('users_dropped_too_short', 0):,}",
    f"{events:,}",
    tokenizer.vocab_size,
    prepared.seconds,
    events / max(prepared.seconds, 1e-9),
  )
  log.write(
    {
      "kind": "start",
      "users": users,
      "vocab_size": tokenizer.vocab_size,
      "params": sum(part_sizes(cfg.model, cfg.cluster.cluster_params)),
      "k": cfg.cluster.k or "auto",
      "data": prepared.stats,
      "prepare_s": prepared.seconds,
      "train_users": train_users,
      "train_tokens": train_tokens,
    }
  )
  return log


def train_hetlm_stage(
  cfg: Config, seqs: UserSequences, workdir: Path, log: MetricsLog, validation: Validation | None, on_round
) -> tuple[Trained, Config, dict | None, dict]:
  """HeTLM: with a fixed K, or the best K (--k=auto), or the best --prox (--tune_baselines), chosen on the
  validation users. Returns (HeTLM, the config the K=1 control follows: the chosen --prox, the K curve, the tuning
  record)."""
  c, vocab_size = cfg.cluster, cfg.model.vocab_size
  if c.k == 0:
    hetlm, k_curve = choose_k(cfg, seqs, workdir, log, validation)
    on_round(hetlm.assignment)
    return hetlm, cfg, k_curve, {}
  if c.tune_baselines:  # HeTLM's --prox from a grid, by the validation users; the chosen one is "hetlm"
    runs = {
      name: train_hetlm(candidate, c.k, seqs, vocab_size, workdir, log, validation, name=name)
      for name, candidate in tuning_grids.prox_candidates(cfg).items()
    }
    hetlm, chosen = tuning_grids.choose("hetlm", runs, validation, log, workdir)
    on_round(hetlm.assignment)
    return hetlm, cfg.replace(cluster=dataclasses.replace(c, prox=hetlm.cfg.cluster.prox)), None, {"hetlm": chosen}
  return train_hetlm(cfg, c.k, seqs, vocab_size, workdir, log, validation, on_round=on_round), cfg, None, {}


def choose_k(cfg: Config, seqs: UserSequences, workdir: Path, log: MetricsLog, validation: Validation):
  """--k=auto: a full HeTLM per candidate K, judged on the validation users' held-out targets."""
  curve, runs = {}, {}
  for k in cfg.cluster.candidates():
    run = train_hetlm(cfg, k, seqs, cfg.model.vocab_size, workdir, log, validation, name=f"hetlm_k{k}")
    curve[k] = validation.nll(run.trainer, run.params, run.assignment, run.weights)
    runs[k] = run
    log.write({"kind": "k_sweep", "k": k, "selection_nll": curve[k], "rounds": run.rounds})
    logging.info("K=%d: validation NLL %.4f", k, curve[k])
  best = min(curve, key=curve.get)
  record_k_auto(workdir, best, curve)  # the chosen K's checkpoints stay under hetlm_kK; load_run reads it as "hetlm"
  return runs[best], curve


def train_baselines(
  cfg: Config,
  hetlm: Trained,
  parts: dict,
  seqs: UserSequences,
  workdir: Path,
  log: MetricsLog,
  validation: Validation | None,
  tuning: dict,
) -> tuple[dict[str, Trained], dict[str, int]]:
  """The single LMs HeTLM is compared with, by the same rules: `single` (one cluster model's size; the init LM
  when HeTLM was warm-started from it), `single_matched` (HeTLM's parameter count) and `single_ft` (the init LM
  fine-tuned exactly as HeTLM's clusters are). `parts`: HeTLM's parameters (hetlm_parameters); `tuning` gains
  single_matched's choice under --tune_baselines. Returns every family with HeTLM first, and their parameter
  counts."""
  c, k = cfg.cluster, hetlm.trainer.k
  models, params = {"hetlm": hetlm}, {"hetlm": parts["total"]}
  if not c.baselines or k == 1:
    return models, params
  single_model = dataclasses.replace(cfg.model, lora_rank=0)  # adapters are a cluster's own: a single LM has none
  matched_model = matched_config(single_model, params["hetlm"])
  logging.info(
    "parameters: %s · single %s · single_matched %s (d_model %d, %d layers)",
    _describe(parts, k),
    f"{param_count(single_model):,}",
    f"{param_count(matched_model):,}",
    matched_model.d_model,
    matched_model.n_layers,
  )
  zeros = lambda: np.zeros(seqs.num_users, np.int32)
  # Same code path with K=1 and the same rules as the LM HeTLM starts from (rounds from scratch, then an
  # anneal): `single` is that LM (its checkpoints are copied when it was trained with the same config).
  for name, model_cfg in (("single", single_model), ("single_matched", matched_model)):
    source = "init_single" if name == "single" and warmed(cfg, k) else None
    candidates = {name: cfg.replace(model=model_cfg)}
    if name == "single_matched" and c.tune_baselines:
      candidates = tuning_grids.matched_candidates(candidates[name])
    runs = {
      n: train_family(n, candidate, 1, seqs, workdir, log, zeros, c.init_rounds, validation, continue_from=source)
      for n, candidate in candidates.items()
    }
    if name in runs:
      models[name] = runs[name]
    else:  # single_matched's learning rate and dropout, by the validation users
      models[name], tuning[name] = tuning_grids.choose(name, runs, validation, log, workdir)
    params[name] = param_count(model_cfg)
  if warmed(cfg, k):  # the K=1 control, fine-tuned from the same LM exactly as HeTLM's clusters are
    models["single_ft"] = train_single_ft(cfg, seqs, workdir, log, validation, hetlm.rounds)
    params["single_ft"] = param_count(cfg.model) * (2 if models["single_ft"].trainer.mix is not None else 1)
  return models, params


def hetlm_parameters(cfg: Config, hetlm: Trained) -> dict:
  """HeTLM's parameter count and its parts: the shared trunk, each cluster's own, and the init LM that
  --mix_init predicts beside them."""
  k = hetlm.trainer.k
  n_shared, n_own = part_sizes(cfg.model, cfg.cluster.cluster_params)
  one = n_shared + n_own
  anchored = one if hetlm.trainer.mix is not None else 0
  return {
    "total": (n_shared + k * n_own if k > 1 else one) + anchored,
    "cluster_params": cfg.cluster.cluster_params,
    "shared": n_shared if k > 1 else 0,
    "per_cluster": n_own if k > 1 else one,
    "init_lm": anchored,
  }


def _describe(parts: dict, k: int) -> str:
  anchored = f" + the init LM's {parts['init_lm']:,}" if parts["init_lm"] else ""
  return f"HeTLM {parts['total']:,} (shared {parts['shared']:,} + K={k} × {parts['per_cluster']:,} own{anchored})"


def training_record(
  cfg: Config,
  models: dict[str, Trained],
  params: dict[str, int],
  parts: dict,
  validation: Validation | None,
  k_curve: dict | None,
  tuning: dict,
) -> dict:
  """What eval.json says about the training: K, rounds, parameters, passes, tokens and seconds per model, the
  stopping rules as the user set them, and the validation statistic every decision read."""
  hetlm, c = models["hetlm"], cfg.cluster
  k = hetlm.trainer.k
  passes = {name: round(m.passes, 2) for name, m in models.items()}
  tokens = {name: int(m.tokens) for name, m in models.items()}
  if hetlm.init_lm is not None:  # the LM HeTLM went on from: what it took counts toward HeTLM's compute too
    passes["init_single"] = round(hetlm.init_lm.passes, 2)
    tokens["init_single"] = int(hetlm.init_lm.tokens)
  extra = {
    "k": k,
    "rounds": hetlm.rounds,
    "params": params,
    "hetlm_params": {key: parts[key] for key in ("cluster_params", "shared", "per_cluster", "init_lm")},
    "data": data_path(cfg),
    "train_s": {name: m.train_s for name, m in models.items()},
    "passes": passes,
    "tokens_trained": tokens,
    "hetlm_is_init_lm": hetlm.kept_init_lm,
    "hetlm_clusters_as_init": hetlm.clusters_as_init,
    "early_stopping": {
      "patience": cfg.train.patience if validation else 0,
      "max_passes_per_round": cfg.train.epochs,
      "warm_passes_per_round": cfg.train.warm_epochs,
      "val_every": cfg.train.val_every,
      "warm_lr_scale": c.warm_lr_scale,
      "prox": c.prox,
      "route_frac": c.route_frac,
      "interpolate": c.interpolate,
      "mix_init": c.mix_init,
      "validation_users": 0 if validation is None else int(hosts.total(np.array(validation.seqs.num_users))[0]),
    },
  }
  if tuning:
    extra["tuning"] = tuning
  if validation is not None:  # the statistic every decision read, per model: per-user mean and its variance
    extra["validation"] = {
      name: dict(zip(("mean", "var"), validation.stats(m.trainer, m.params, m.assignment, m.weights)))
      for name, m in models.items()
    }
  if k_curve is not None:
    extra["k_sweep"] = {
      "selection_nll": {str(key): v for key, v in k_curve.items()},
      "note": "K chosen on the validation users' held-out targets; they are left out of n_users",
    }
  return extra


def train_llm(
  cfg: Config, prepared: Prepared, seqs: UserSequences, validation: Validation | None, workdir: Path, log: MetricsLog
) -> dict:
  """--llm: {its name: the LLM baseline}, trained by the page LMs' rules on the same users (llm/); {} without it."""
  if not cfg.llm.llm:
    return {}
  from hetlm_jax.llm.baseline import LLMBaseline  # torch and transformers: the optional [llm] extra

  llm = LLMBaseline(cfg, prepared.tokenizer, workdir)
  llm.train(seqs, validation, log)
  return {llm.name: llm}


def evaluate_stage(
  models: dict[str, Trained],
  prepared: Prepared,
  seqs: UserSequences,
  evaluated_U: np.ndarray,
  workdir: Path,
  log: MetricsLog,
  extra: dict,
  llms: dict | None = None,
) -> dict:
  """Every model per user on the held-out targets (or the test users, split by user): eval.json, report.md."""
  families = {
    name: LMFamily(
      name, m.trainer, m.params, m.assignment, cluster_shares(m.assignment, m.weights, m.trainer.k), m.history_share
    )
    for name, m in models.items()
  }
  rounds = hetlm_rounds(log, models["hetlm"].name)
  opts = eval_options(models["hetlm"].cfg)
  if prepared.test_seqs is not None:
    report = evaluate_new_users(
      families, seqs, prepared.test_seqs, prepared.tokenizer, workdir, opts, extra=extra, rounds=rounds
    )
  else:
    report = evaluate(
      families, seqs, prepared.tokenizer, workdir, evaluated_U, opts, extra=extra, rounds=rounds, llms=llms
    )
  for name, summary in report["models"].items():
    logging.info("%-15s held-out NLL %.4f ± %.4f nats/token", name, summary["nll"]["mean"], summary["nll"]["std"])
  for name, bits in report.get("bits_per_token", {}).items():
    logging.info("%-22s %.4f bits/page token (no end marker), %.4f with it", name, bits["no_end"], bits["with_end"])
  log.write({"kind": "eval", "models": {name: m["nll"] for name, m in report["models"].items()}})
  log.close()
  return report


def eval_options(cfg: Config) -> EvalOptions:
  """The evaluation's draws: with --split=hash, each user's by its id (EvalOptions.by_id), as the split's."""
  return EvalOptions(by_id=cfg.data.split == "hash")


def hetlm_rounds(log: MetricsLog, name: str) -> list[dict]:
  """The E-step records of HeTLM family `name` (the report draws its cluster sizes and churn)."""
  return [r for r in log.records("round") if r["model"] == name]


# -- hetlm evaluate and hetlm generate -------------------------------------------------------------------------


def evaluate_workdir(workdir: str | Path, data: str | None = None, llm: LLMConfig | None = None) -> dict:
  """`hetlm evaluate`: re-evaluates every trained model in `workdir` on its data (the validation users left
  out, as `train` does), or on every user of `data`. `llm`: the LLM baseline to add (trained on the run's own
  training users first, when it is fine-tuned and not yet); by default the run's own --llm, if it had one."""
  workdir = location(workdir)
  with interrupt.stop_handler(), contextlib.ExitStack() as held:
    cfg, prepared = run_data(workdir, data)
    if llm is not None:
      cfg = cfg.replace(llm=llm)
      validate(cfg)
      check_llm(cfg)
    hold(held, workdir, "evaluate")  # it rewrites eval.json and report.md
    seqs, _, evaluated_U = validation_slice(cfg, prepared) if data is None else (prepared.seqs, None, None)
    llms = evaluated_llm(cfg, workdir, prepared if data is None else None, held)
    families = trained_families(workdir, seqs)
    rounds = hetlm_rounds(open_metrics(workdir), family_name(workdir, "hetlm"))
    extra = {**training_provenance(workdir), "data": data_path(cfg)}
    opts = eval_options(cfg)
    if prepared.test_seqs is not None:
      return evaluate_new_users(
        families, seqs, prepared.test_seqs, prepared.tokenizer, workdir, opts, extra=extra, rounds=rounds
      )
    return evaluate(
      families, seqs, prepared.tokenizer, workdir, evaluated_U, opts, rounds=rounds, extra=extra, llms=llms
    )


def evaluated_llm(cfg: Config, workdir: Path, prepared: Prepared | None, held: contextlib.ExitStack) -> dict:
  """`hetlm evaluate`'s LLM baseline: trained (or read) on the run's own data (`prepared`, or read again when the
  evaluation is of other data), with its split and validation users, as `hetlm train --llm` would."""
  if not cfg.llm.llm:
    return {}
  own = prepared if prepared is not None else run_data(workdir, None)[1]
  seqs, validation, _ = validation_slice(cfg, own)
  train_seqs = routing_split(seqs, cfg.cluster.route_frac) if cfg.cluster.route_frac else seqs
  log = open_metrics(workdir)
  held.callback(log.close)
  return train_llm(cfg, own, train_seqs, validation, workdir, log)


def trained_families(workdir: Path, seqs: UserSequences, names=LM_NAMES) -> dict[str, LMFamily]:
  """Every trained model family of `names` in `workdir`, with each user of `seqs` routed to one of its models:
  by the saved assignment when the user was trained on, else by the perplexity of their history."""
  families = {}
  for name in names:
    try:
      run = load_run(workdir, name)
    except HetlmError:
      continue
    k = num_models(run.params)
    family = LMFamily(
      name,
      run.trainer,
      run.params,
      np.zeros(seqs.num_users, np.int32),
      cluster_shares(run.assignment, run.weights, k, mine=False),
    )
    if k > 1:
      family.assignment = saved_or_routed(workdir, family, seqs)
    families[name] = family
  if not families:
    raise HetlmError(f"{workdir}: no trained model under checkpoints/; run `hetlm train` first")
  return families


def saved_or_routed(workdir: Path, family: LMFamily, seqs: UserSequences) -> np.ndarray:
  """[U] each user's saved cluster, or for a user the models never saw, the lowest perplexity of their history."""
  assignment_U = SavedAssignment(workdir).lookup(seqs.user_ids)
  unknown = np.flatnonzero(assignment_U < 0)
  # with --own_users each process holds its own users: every process scores, with or without unknown users
  if hosts.any_process(bool(len(unknown))) if hosts.own_users() else len(unknown):
    assignment_U[unknown] = route_by_history(family, seqs.subset(unknown))
  return assignment_U


def generate_for_user(workdir: str | Path, user: str, data: str | None = None, sampling: Sampling = Sampling()) -> dict:
  """`hetlm generate`: the user's history, their next session generated by their cluster's model, the actual one."""
  workdir = location(workdir)
  cfg, prepared = run_data(workdir, data)
  if hosts.own_users():
    raise HetlmError("hetlm generate reads one user: run it as one process (the run's --own_users needs no more)")
  seqs, tokenizer = prepared.seqs, prepared.tokenizer
  matches = np.flatnonzero(seqs.user_ids.astype(str) == str(user))
  if len(matches) == 0:
    raise HetlmError(f"{data_path(cfg)}: no user {user!r} with enough events to hold out a next session")
  one = seqs.subset(matches[:1])
  family = trained_families(workdir, one, names=("hetlm",))["hetlm"]
  interrupt.safe_point("before generating", "generate writes nothing")
  length = session_length_from_data(seqs, tokenizer.num_specials)  # when the model never saw a session end
  if length is not None:
    sampling = dataclasses.replace(sampling, max_new=min(sampling.max_new, length))
  generated = generate(
    family.trainer.cfg.model,
    family.params,
    one,
    family.assignment,
    np.array([0]),
    sampling,
    seed=cfg.train.seed,
    mix=family.trainer.mix,
  )[0]
  actual = one.target(0)
  actual = actual[(actual != BOS) & (actual != EOS)]  # the next session's pages: `generated` has no <s> or </s>
  return {
    "user": str(user),
    "cluster": int(family.assignment[0]),
    "history": tokenizer.decode(one.history(0)),
    "generated": tokenizer.decode(generated),
    "actual": tokenizer.decode(actual),
  }
