"""Command line: `hetlm train|evaluate|generate|predict|bench` with absl flags (presets: --flagfile=configs/NAME.flags)."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import sys

from absl import app, flags, logging

from hetlm_jax.config import FLAG_NAMES, ClusterConfig, Config, DataConfig, ModelConfig, TrainConfig
from hetlm_jax.errors import HetlmError

COMMANDS = ("train", "evaluate", "generate", "predict", "bench")
_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "cluster": ClusterConfig}
_HELP = {
  "path": "Browsing log (Parquet/CSV events, UCI msnbc, or 'user item' lines); default: the packaged msnbc sample.",
  "format": "Input format: auto, events, msnbc or user_items.",
  "k": "Number of cluster models K, or auto (the best of --k_candidates by held-out NLL).",
  "k_candidates": "The K values --k=auto tries, separated by commas.",
  "rounds": "Reassignment rounds at most (each trains until the validation NLL stops improving).",
  "tolerance": "Stop once fewer than this fraction of users change cluster in a round.",
  "init": "Initial assignment: random (balanced), features (k-means on TF-IDF page/transition counts), "
          "embedding (k-means on a single LM's mean hidden states).",
  "warm_start": "With --init=embedding, start every cluster model from that single LM.",
  "soft": "Soft EM: after the first round every cluster model trains on every user, each weighted by the "
          "posterior of that cluster given the user's history (assignments.parquet keeps the most likely).",
  "init_rounds": "Rounds from scratch of every single LM, at most: the one --init=embedding clusters (and "
                 "--warm_start copies), single and single_matched; each then anneals (see --warm_epochs).",
  "warm_lr_scale": "Warm-started rounds (HeTLM's clusters, single_ft) start at this fraction of --learning_rate, "
                   "with no warmup, and decay to 1/20 of it.",
  "prox": "Warm-started models: the gradient of prox/2 ||theta - theta_init||^2, a pull toward the LM they "
          "start from (0: none).",
  "route_frac": "Keep this last share of every training user's history out of training, and route users "
                "(the E-step) by it alone, so reassignment never rewards memorising (0: route by the whole "
                "history).",
  "tune_baselines": "Choose HeTLM's --prox (0, 1, 3) and single_matched's learning rate (1/3 and 1 x "
                    "--learning_rate) and dropout (+0, +0.1) on the validation users: both sides tuned, not one; "
                    "trains 3 HeTLMs and 4 single_matched LMs instead of one each.",
  "interpolate": "Warm-started models end as alpha_k theta_k + (1 - alpha_k) theta_init, their parameters "
                 "interpolated toward the LM they started from, alpha per cluster from 0, 0.25, ..., 1 by the "
                 "validation users (alpha 0 for all is that LM, so validation cannot see them fall below it).",
  "mix_init": "Warm-started models predict lam_k p_k + (1 - lam_k) p_init, a mixture in prediction space with the "
              "LM they started from, lam per cluster from 0, 0.25, ..., 1 by the validation users; that LM's "
              "parameters count in HeTLM's total, and scoring and decoding run it beside the K models.",
  "warm_epochs": "Passes at most of a round that goes on from a trained model: a warm-started round, and the "
                 "anneal that ends every single LM.",
  "val_every": "Passes between validations in such a round (a round from scratch validates every pass).",
  "max_repeat": "With --balance: a smaller cluster's users appear at most this many times per pass (0: no cap).",
  "min_cluster_frac": "A cluster smaller than this fraction of U/K is re-seeded by splitting the largest.",
  "baselines": "Also train the single-LM baselines (per-cluster size and parameter-matched).",
  "context": "Tokens the model attends over at once; a longer history is trained on and scored in windows of "
             "this many tokens that cover all of it, and next pages and generation condition on its last ones.",
  "holdout": "How single-session users are split: half (prefix/suffix), last (last page), auto.",
  "session_gap_minutes": "Inactivity that starts a new session when the log has no session_id.",
  "epochs": "Passes over every user per round, at most: the learning-rate schedule's cycle, cut short by "
            "early stopping.",
  "patience": "Stop a round after this many validations without a better per-user mean validation NLL; a "
              "round from scratch counts them once half of --epochs is trained (0: train every pass).",
  "val_frac": "Share of the training users whose held-out targets decide early stopping and --k=auto; they are "
              "left out of the reported evaluation.",
  "batch_size": "Windows per cluster per step, over all devices.",
  "log_every": "Steps between training records in metrics.jsonl (the progress line shows at least every 10 s).",
  "prefetch": "Batches built on the host and put on the devices ahead of the step, in a background thread "
              "(0: built in the step loop).",
  "tensorboard": "Also write TensorBoard event files beside metrics.jsonl, one run per model in WORKDIR/tensorboard "
                 "(needs tensorboardX: pip install tensorboardX, or pip install -e '.[tensorboard]' in the "
                 "repository).",
  "stack": "How the K models share one jitted step: vmap (batched matmuls), unroll (K graphs in one program, "
           "faster steps on CPU, but longer to compile as K grows) or auto (unroll a single model on CPU, "
           "vmap for K > 1 and elsewhere).",
  "balance": "Smaller clusters cycle their own users, each token weighted by 1/appearances, instead of "
             "training on padding while the largest cluster finishes its epoch.",
  "dtype": "Compute dtype: auto (bfloat16 on GPU and TPU, float32 on CPU), float32 or bfloat16; parameters stay float32.",
  "cluster_axis": "Devices on the 'cluster' mesh axis (the rest shard the batch).",
  "cluster_params": "Which parameters each cluster owns; the rest is one shared trunk trained on every user: all "
                    "(K whole models), head (final norm and output bias), top:N (also the last N blocks), "
                    "adapters:R (also LoRA of rank R on every projection).",
  "max_users": "Keep only the first N users of the log (0: all).",
  "test_users": "Split by user instead of in time: N users, never trained on, whose whole sequences are the "
                "test (0: each user's last session is held out).",
  "train_users": "With --test_users: the number of users to train on (0: all the others).",
  "split_seed": "The split by user permutes users with numpy.random.default_rng(split_seed).",
  "test_offset": "With --test_users: the test users start at this position of that permutation, and the training "
                 "users are the first --train_users of the others, so runs of different sizes share one test "
                 "set (-1: right after the training users).",
  "d_model": "Width of each cluster model's residual stream.",
  "n_layers": "Transformer blocks per model.",
  "n_heads": "Attention heads per block (d_model must divide into them, with an even head width).",
  "d_ff": "Width of each block's feed-forward layer.",
  "dropout": "Dropout rate on embeddings, attention and feed-forward outputs while training.",
  "positions": "Position encoding: rope (rotary, restarting in every packed segment) or learned.",
  "tie_embeddings": "Share the page embedding with the output layer.",
  "learning_rate": "Peak AdamW learning rate of each round's warmup-then-cosine schedule.",
  "warmup_frac": "Share of each round's cap of steps spent warming the learning rate up.",
  "weight_decay": "AdamW weight decay (not on norms, biases or learned positions).",
  "grad_clip": "Clip each model's gradient to this global norm.",
  "seed": "Seed of initialisation, shuffling, dropout and k-means: the same seed gives the same run.",
  "checkpoint_every": "Steps between periodic checkpoints (one is also saved at the end of every round).",
  "keep_checkpoints": "Checkpoints kept per model; older ones are deleted.",
  "eval_batch_size": "Rows per batch when scoring users (evaluation, validation, reassignment).",
  "min_count": "Pages seen fewer times than this in training histories share one unknown-page token.",
  "max_vocab": "Keep only the most frequent pages, up to this many (0: no cap).",
}
_GROUPS = {"data": "data", "model": "model", "train": "training", "cluster": "clustering"}
_COMMANDS_HELP = {
  "train": "train HeTLM and the single-LM baselines on a log, evaluate them, write WORKDIR/report.md",
  "evaluate": "evaluate a trained workdir again, on its own data or on --data",
  "generate": "print a user's history, the next session their cluster's model generates, and the actual one",
  "predict": "for every user of a log (--data), their cluster, next pages, NLL and outcome chances: one Parquet "
             "row each (--out)",
  "bench": "measure throughput: stacked step, per-model loop, PyTorch, MFU, scoring (--out=FILE.json)",
}
_HOSTS = ("coordinator_address", "num_processes", "process_id")
# The run flags each command's help lists; --inject (faults planted by the tests) is left out of every one.
_RUN_FLAGS = {"train": ("workdir", *_HOSTS, "compilation_cache"),
              "evaluate": ("workdir", "data", *_HOSTS, "compilation_cache"),
              "generate": ("workdir", "data", "user", "max_new", "temperature", "top_k", "top_p", "compilation_cache"),
              "predict": ("workdir", "data", "format", "out", "model", "top_k", "mixture", "chunk_users", "outcome_samples",
                          "num_processes", "process_id", "compilation_cache"),
              "bench": ("out", "bench_steps", "bench_k", "bench_torch", "sweep")}
_DERIVED = ("vocab_size", "output_bias", "lora_rank")  # set from the data and --cluster_params, not flags
# --data's empty default, said in words in each command's help.
_DATA_DEFAULT = {"train": "(the packaged msnbc sample)", "bench": "(the packaged msnbc sample)",
                 "evaluate": "(the run's own data)", "generate": "(the run's own data)", "predict": "(required)"}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, tokenizer, config, metrics.")
flags.DEFINE_string("out", "", "bench: write the measurements to this JSON file. predict: the Parquet file to write "
                    "(with several processes, a folder of part files and a _SUCCESS manifest).")
flags.DEFINE_string("model", "hetlm", "predict: the model family: hetlm, single, single_ft or single_matched.")
flags.DEFINE_boolean("mixture", False, "predict: rank next pages under the mixture of the K models weighted by "
                     "P(k | history), not the routed model alone.")
flags.DEFINE_integer("chunk_users", 4096, "predict: users read, predicted and written at a time (memory is bounded "
                     "by this, not by the file).")
flags.DEFINE_integer("outcome_samples", 8, "predict: sampled continuations per user for the outcome_* chances "
                     "(0: no outcome columns).")
flags.DEFINE_integer("bench_steps", 20, "bench: timed steps per measurement (after two untimed ones).")
flags.DEFINE_integer("bench_k", 8, "bench: the number of stacked models measured.")
flags.DEFINE_boolean("bench_torch", True, "bench: also measure the same models in PyTorch (needs torch).")
flags.DEFINE_string("sweep", "", "bench: also measure these d_model x K (x vocabulary) sizes, one row each (e.g. "
                    "64x8,256x4x2000); full: d_model 64, 256, 512, 1024 times K 1, 4, 8, 16; compile: K 1, 8, 16 "
                    "times vocabulary 64, 2000, 20000 at d_model 64.")
flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0's coordinator (jax.distributed); "
                    "not needed under SLURM (srun) or on a Cloud TPU VM slice, where it is found.")
flags.DEFINE_integer("num_processes", 0, "Multi-process: the number of processes (one per host) with "
                     "--coordinator_address.")
flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index, 0 to --num_processes - 1.")
flags.DEFINE_string("inject", "", "Testing: KIND@STEP plants a fault after global step STEP: sigterm, sigint or "
                    "sigkill sent to this process, or nan (that step's loss); KIND@PHASE sends the signal as a phase "
                    "begins: prepare, kmeans, estep, evaluate or report.")
flags.DEFINE_string("compilation_cache", "", "Where compiled programs are kept between runs (JAX's persistent "
                    "cache), so a second run or a resume does not compile them again: a directory, or none; default "
                    "$HETLM_COMPILATION_CACHE, else ~/.cache/hetlm_jax/jax. bench always compiles afresh.")
flags.DEFINE_string("user", "", "generate: the user_id whose next session to generate.")
flags.DEFINE_integer("max_new", 20, "generate: tokens to generate at most (stops earlier at session end).")
flags.DEFINE_float("temperature", 0.0, "generate: 0 for greedy decoding, else the sampling temperature.")
flags.DEFINE_integer("top_k", 0, "generate: sample among the k most likely tokens (0: all). predict: next pages "
                     "listed per user (0: 10).")
flags.DEFINE_float("top_p", 1.0, "generate: sample within the smallest set holding this probability mass.")


def _define_config_flags() -> None:
  for section, cls in _SECTIONS.items():
    for field in dataclasses.fields(cls):
      if field.name in _DERIVED:
        continue
      name, default = FLAG_NAMES.get(field.name, field.name), field.default
      help_text = _HELP.get(field.name, f"{section}.{field.name}")
      if name == "k":  # an integer, or "auto"
        flags.DEFINE_string(name, str(default), help_text)
        continue
      define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                str: flags.DEFINE_string}[type(default)]
      define(name, default, help_text)


_define_config_flags()


def _k_from_flag(text: str) -> int:
  if text.strip().lower() == "auto":
    return 0
  try:
    k = int(text)
  except ValueError:
    raise HetlmError(f"--k={text}: expected an integer or auto") from None
  if k < 1:
    raise HetlmError(f"--k={text} must be at least 1 (or auto)")
  return k


def _sweep_from_flag(text: str) -> list[tuple[int, ...]]:
  if text.strip() == "full":
    return [(d, k) for d in (64, 256, 512, 1024) for k in (1, 4, 8, 16)]
  if text.strip() == "compile":
    return [(64, k, v) for k in (1, 8, 16) for v in (64, 2000, 20000)]
  sizes = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    try:
      size = tuple(int(x) for x in item.lower().split("x"))
    except ValueError:
      size = ()
    if len(size) not in (2, 3):
      raise HetlmError(f"--sweep={text}: expected d_model x K (x vocabulary) sizes such as 64x8,256x4x2000, full "
                       "or compile")
    if size[0] < 8 or size[0] % 8 or size[1] < 1 or len(size) == 3 and size[2] < 16:
      raise HetlmError(f"--sweep={text}: {item} needs d_model a multiple of 8, K at least 1 and a vocabulary of at "
                       "least 16")
    sizes.append(size)
  return sizes


def config_from_flags() -> Config:
  sections = {}
  for section, cls in _SECTIONS.items():
    sections[section] = cls(**{f.name: FLAGS[FLAG_NAMES.get(f.name, f.name)].value
                               for f in dataclasses.fields(cls) if f.name not in _DERIVED})
  sections["cluster"] = dataclasses.replace(sections["cluster"], k=_k_from_flag(FLAGS.k))
  return Config(**sections)


def _main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise HetlmError(f"expected a command ({' | '.join(COMMANDS)}), got {' '.join(argv[1:]) or 'none'}")
  if len(argv) > 2:
    raise HetlmError(f"unexpected arguments: {' '.join(argv[2:])}")
  cfg = config_from_flags()
  from hetlm_jax.train import interrupt
  interrupt.inject(FLAGS.inject)
  # One stop handler for the whole command, before anything is read: a signal stops it at the next safe point.
  from hetlm_jax import compilation
  compilation.setup("none" if argv[1] == "bench" else FLAGS.compilation_cache)  # bench measures compile time
  compilation.reset_counts()
  with interrupt.stop_handler() as stop:
    try:
      status = _command(argv[1], cfg, stop)
    except interrupt.Preempted as stopped:
      _say_stopped(f"{stopped.signal_name}: stopped at step {stopped.step} of {stopped.model}, with a checkpoint "
                   "there. The same command resumes the run")
      return 0
    except interrupt.Stopped as stopped:
      again = "resumes the run" if argv[1] == "train" else "starts again"
      _say_stopped(f"{stopped.signal_name}: stopped {stopped.where}; {stopped.kept}. The same command {again}")
      return 0
    if stop.received and _primary():
      print(f"{stop.received} arrived as the command was finishing; it finished first.", flush=True)
    if line := compilation.summary():
      logging.info("%s", line)
    return status


def _primary() -> bool:
  from hetlm_jax import hosts
  return hosts.is_primary()


STOP_MARKER = "HETLM_STOP_MARKER"  # a file to write when a signal stopped the command before it finished


def _say_stopped(message: str) -> None:
  """The stop message, and the marker a batch script reads to requeue the job (launch/slurm.sbatch)."""
  if _primary():
    print(f"{message}:\n  {resume_command()}", flush=True)
    if os.environ.get(STOP_MARKER):
      from hetlm_jax.files import replace_text
      replace_text(os.environ[STOP_MARKER], message + "\n")


def _command(command: str, cfg: Config, stop) -> int:
  if command == "bench":
    if FLAGS.bench_steps < 1:
      raise HetlmError(f"--bench_steps={FLAGS.bench_steps} must be at least 1")
    if FLAGS.bench_k < 1:
      raise HetlmError(f"--bench_k={FLAGS.bench_k} must be at least 1")
    sweep = _sweep_from_flag(FLAGS.sweep)
    from hetlm_jax.bench import run_bench
    run_bench(cfg, FLAGS.out or None, FLAGS.bench_steps, FLAGS.bench_k, sweep, FLAGS.bench_torch)
    return 0
  data = FLAGS.data if FLAGS["data"].present else None
  from hetlm_jax import hosts  # the processes of a multi-host job join first
  if command in ("train", "evaluate"):
    hosts.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    stop.take_back()
  if command == "evaluate":
    from hetlm_jax.pipeline import evaluate_workdir
    report = evaluate_workdir(FLAGS.workdir, data)
    if hosts.is_primary():
      _summary(report, FLAGS.workdir)
    return 0
  if command == "generate":
    return _generate(data)
  if command == "predict":
    return _predict(data)
  from hetlm_jax.pipeline import train_and_evaluate
  report = train_and_evaluate(cfg, FLAGS.workdir)
  if hosts.is_primary():
    _summary(report, FLAGS.workdir)
  return 0


_argv: list[str] = []  # the command line as typed, for the resume command


def resume_command() -> str:
  import shlex
  words = [word for word in _argv if not word.startswith("--inject")]
  return shlex.join(["hetlm", *words[1:]])


def _summary(report: dict, workdir: str) -> None:
  """The last three lines of train and evaluate: the models' held-out NLL, which is lowest, where to read on."""
  from pathlib import Path
  nll = {name: metrics["nll"]["mean"] for name, metrics in report.get("models", {}).items() if "nll" in metrics}
  lms = [name for name in ("hetlm", "single", "single_ft", "single_matched") if name in nll]
  print("held-out NLL (nats/token, mean over users): " + ", ".join(f"{name} {nll[name]:.4f}" for name in lms))
  if lms:
    best = min(lms, key=nll.get)
    note = " (HeTLM kept its warm-start LM: no HeTLM pass beat it)" if report.get("hetlm_is_init_lm") else ""
    print(f"lowest among the LMs: {best}{note}; per-user intervals and the other metrics are in the report")
  print(f"report: {Path(workdir) / 'report.md'} (eval.json, assignments.parquet and checkpoints/ beside it)")


def _generate(data: str | None) -> int:
  if not FLAGS.user:
    raise HetlmError("generate needs --user=ID")
  if FLAGS.max_new < 1 or FLAGS.temperature < 0 or FLAGS.top_k < 0 or not 0 < FLAGS.top_p <= 1:
    raise HetlmError("--max_new must be ≥ 1, --temperature ≥ 0, --top_k ≥ 0 and --top_p in (0, 1]")
  from hetlm_jax.eval.generate import Sampling
  from hetlm_jax.pipeline import generate_for_user
  out = generate_for_user(FLAGS.workdir, FLAGS.user, data,
                          Sampling(FLAGS.max_new, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p))
  print(f"user {out['user']} (cluster {out['cluster']})")
  for label in ("history", "generated", "actual"):
    print(f"{label + ':':11}{' '.join(out[label])}")
  return 0


def _process_share() -> tuple[int, int]:
  """(this process, processes) of a `hetlm predict` job: --process_id/--num_processes, else srun's task, else
  (0, 1). The processes need not talk to each other: each predicts its own chunks of users."""
  if FLAGS.num_processes > 1 or FLAGS.process_id >= 0:
    if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise HetlmError(f"--num_processes={FLAGS.num_processes} --process_id={FLAGS.process_id}: expected "
                       "0 <= process_id < num_processes")
    return FLAGS.process_id, FLAGS.num_processes
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
    return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
  return 0, 1


def _predict(data: str | None) -> int:
  if not data or not FLAGS.out:
    raise HetlmError("predict needs --data=EVENTS (the users to predict for) and --out=PREDICTIONS.parquet")
  from hetlm_jax.predict import predict_file
  process, processes = _process_share()
  s = predict_file(FLAGS.workdir, data, FLAGS.out, FLAGS.format, FLAGS.model, FLAGS.top_k or 10, FLAGS.mixture,
                   FLAGS.chunk_users, FLAGS.outcome_samples, FLAGS.seed, process, processes)
  shares = ", ".join(f"{c}: {n / max(s['users'], 1):.0%}" for c, n in enumerate(s["clusters"]))
  print(f"predicted {s['users']:,} users ({s['events']:,} events) in {s['seconds']:.1f}s, "
        f"{s['users_per_s']:,.0f} users/s")
  rss = s["peak_rss_mib"]
  print(f"clusters (K={s['k']}): {shares}; history pages the models never saw: {s['unknown_pages']:,}; peak memory "
        f"{rss[-1] if rss else 0:,.0f} MiB ({rss[0] if rss else 0:,.0f} MiB after the first chunk)")
  print(f"wrote {s['out']}" + (f" (part {process} of {processes}; _SUCCESS beside the parts once all are "
                               "written)" if processes > 1 else ""))
  return 0


def _fail(message) -> int:
  message = str(message)
  flagfile = "ERROR:: Unable to open flagfile: "  # absl's wording, then the OSError's
  if message.startswith(flagfile):
    message = "--flagfile: cannot open " + re.sub(r"^\[Errno \d+\] (.*): '(.*)'$", r"\2 (\1)",
                                                   message.removeprefix(flagfile))
  print(f"hetlm: error: {message}", file=sys.stderr)
  return 2


def _parse(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(_fail(e))


def main(argv: list[str]) -> int:
  """Runs a parsed command line; bad input becomes one error line and exit status 2."""
  try:
    return _main(argv)
  except HetlmError as e:
    return _fail(e)
  except OSError as e:  # the disk filled up or a file became unwritable during the run
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
      raise
    return _fail(f"{e.filename or '--workdir'}: {e.strerror}")
  except KeyboardInterrupt:  # a second Ctrl-C (the first stops at the next safe point): nothing half-written
    print(f"hetlm: interrupted; what was saved is kept, and the same command resumes:\n  {resume_command()}",
          file=sys.stderr)
    return 130


_HELP_FLAGS = ("--help", "-h", "-?", "--helpfull", "--helpshort")


def help_text(command: str | None) -> str:
  """`hetlm --help` (the commands) or `hetlm COMMAND --help` (its flags, grouped, with defaults)."""
  if command not in COMMANDS:
    lines = ["usage: hetlm COMMAND [--flag=value ...] [--flagfile=configs/NAME.flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in _COMMANDS_HELP.items()]
    lines += ["", "`hetlm COMMAND --help` lists that command's flags, with their defaults."]
    return "\n".join(lines)

  def flag(name: str) -> str:
    default = FLAGS[name].default
    shown = str(default).lower() if isinstance(default, bool) else default
    shown = _DATA_DEFAULT[command] if name == "data" else shown
    return f"  --{name}={shown}\n      {FLAGS[name].help}"

  lines = [f"usage: hetlm {command} [--flag=value ...]", "", _COMMANDS_HELP[command] + "."]
  if command in ("train", "bench"):  # evaluate and generate take the settings saved in the workdir
    for section in ("data", "model", "train", "cluster"):
      fields = dataclasses.fields(_SECTIONS[section])
      names = [FLAG_NAMES.get(f.name, f.name) for f in fields if f.name not in _DERIVED]
      lines += ["", f"{_GROUPS[section]}:"] + [flag(name) for name in names]
  lines += ["", "run:"] + [flag(name) for name in _RUN_FLAGS[command]]
  return "\n".join(lines)


def _asks_for_help(argv: list[str]) -> bool:
  return any(arg in _HELP_FLAGS for arg in argv[1:])


def _print_help(argv: list[str]) -> int:
  command = next((arg for arg in argv[1:] if arg in COMMANDS), None)
  try:
    print(help_text(command), flush=True)
  except BrokenPipeError:  # e.g. piped into head
    sys.stdout = open(os.devnull, "w")
  return 0


def cli(argv: list[str]) -> int:
  """Parses flags afresh and runs: the whole program without a process (used by the tests)."""
  if _asks_for_help(argv):
    return _print_help(argv)
  FLAGS.unparse_flags()
  _argv[:] = argv
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    return _fail(e)
  return main(rest)


class _QuietLibraries:
  """Keeps orbax's per-save INFO chatter out of the run log; its warnings still show."""

  def filter(self, record) -> bool:
    if record.levelno < 30 and record.getMessage().startswith("Unable to initialize backend"):
      return False  # JAX trying every platform (tpu, cuda, ...) on a machine without it: not news to a user
    return record.levelno >= 30 or "orbax" not in record.pathname


def run() -> None:
  """Console-script entry point."""
  if _asks_for_help(sys.argv):
    sys.exit(_print_help(sys.argv))
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _argv[:] = sys.argv
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse)


if __name__ == "__main__":
  run()
