"""Command line: `hetlm train|evaluate|generate|predict|bench` with absl flags (presets:
--flagfile=configs/NAME.flags); the flags of the run's settings are generated from config.py."""

from __future__ import annotations

import errno
import os
import re
import sys

from absl import app, flags, logging

from hetlm_jax.config import SECTIONS, Config, flag_name, options, parse_auto
from hetlm_jax.errors import HetlmError

COMMANDS = ("train", "evaluate", "generate", "predict", "bench")
_GROUPS = {"data": "data", "model": "model", "train": "training", "cluster": "clustering", "llm": "LLM baseline"}
_COMMANDS_HELP = {
  "train": "train HeTLM and the single-LM baselines on a log, evaluate them, write WORKDIR/report.md",
  "evaluate": "evaluate a trained workdir again, on its own data or on --data",
  "generate": "print a user's history, the next session their cluster's model generates, and the actual one",
  "predict": "for every user of a log (--data), their cluster, next pages, NLL and outcome chances: one Parquet "
  "row each (--out)",
  "bench": "measure throughput: stacked step, per-model loop, PyTorch, MFU, scoring (--out=FILE.json)",
}
_HOSTS = ("coordinator_address", "num_processes", "process_id")
# `hetlm evaluate --llm=...` adds an LLM baseline to a finished run with these (the run's own otherwise).
_LLM_FLAGS = tuple(flag_name(f) for f in options("llm"))
# The run flags each command's help lists; --inject (faults planted by the tests) is left out of every one.
_RUN_FLAGS = {
  "train": ("workdir", *_HOSTS, "compilation_cache"),
  "evaluate": ("workdir", "data", *_LLM_FLAGS, *_HOSTS, "compilation_cache"),
  "generate": ("workdir", "data", "user", "max_new", "temperature", "top_k", "top_p", "compilation_cache"),
  "predict": (
    "workdir",
    "data",
    "format",
    "out",
    "model",
    "top_k",
    "mixture",
    "chunk_users",
    "memory_mb",
    "grouped",
    "buckets",
    "outcome_samples",
    "num_processes",
    "process_id",
    "compilation_cache",
  ),
  "bench": ("out", "bench_steps", "bench_k", "bench_torch", "sweep"),
}
# --data's empty default, said in words in each command's help.
_DATA_DEFAULT = {
  "train": "(the packaged msnbc sample)",
  "bench": "(the packaged msnbc sample)",
  "evaluate": "(the run's own data)",
  "generate": "(the run's own data)",
  "predict": "(required)",
}

# A shared flag's meaning in one command (its help there, and the default that command uses for an empty value).
_COMMAND_FLAG_HELP = {
  ("predict", "data"): "The log of the users to predict for: a file, a folder of parts, a glob, a list or a URI; "
  "in any order (grouped by user first, within --memory_mb).",
  ("evaluate", "data"): "Evaluate on every user of this log instead of the run's own data (any input train reads).",
  ("generate", "data"): "Read the user's history from this log instead of the run's own data.",
  ("predict", "out"): "The Parquet file to write, ending in .parquet (with several processes, a folder of part "
  "files and a _SUCCESS manifest); its folder must exist.",
  ("bench", "out"): "Write the measurements to this JSON file.",
  ("predict", "top_k"): "Next pages listed per user.",
  ("generate", "top_k"): "Sample among the k most likely tokens (0: all).",
}
_COMMAND_DEFAULT = {("predict", "top_k"): 10}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, tokenizer, config, metrics.")
flags.DEFINE_string(
  "out",
  "",
  "bench: write the measurements to this JSON file. predict: the Parquet file to write "
  "(with several processes, a folder of part files and a _SUCCESS manifest).",
)
flags.DEFINE_string("model", "hetlm", "predict: the model family: hetlm, single, single_ft or single_matched.")
flags.DEFINE_boolean(
  "mixture",
  False,
  "predict: rank next pages under the mixture of the K models weighted by P(k | history), not the routed model alone.",
)
flags.DEFINE_integer(
  "chunk_users",
  4096,
  "predict: users predicted and written at a time (with --memory_mb, what bounds memory, not the file).",
)
flags.DEFINE_boolean(
  "grouped",
  False,
  "predict: the log's users are already together (sorted or grouped by user): read it once, in file order, "
  "instead of grouping it by user first.",
)
flags.DEFINE_integer(
  "memory_mb",
  1024,  # predict.DEFAULT_MEMORY_MB, written out so the command line does not import predict (JAX) to start
  "predict: events held in memory at a time, in MiB; a log larger than this is grouped by user through bucket files "
  "beside --out.",
)
flags.DEFINE_integer("buckets", 0, "predict: bucket files for grouping the log by user (0: from --memory_mb).")
flags.DEFINE_integer(
  "outcome_samples", 8, "predict: sampled continuations per user for the outcome_* chances (0: no outcome columns)."
)
flags.DEFINE_integer("bench_steps", 20, "bench: timed steps per measurement (after two untimed ones).")
flags.DEFINE_integer("bench_k", 8, "bench: the number of stacked models measured.")
flags.DEFINE_boolean("bench_torch", True, "bench: also measure the same models in PyTorch (needs torch).")
flags.DEFINE_string(
  "sweep",
  "",
  "bench: also measure these d_model x K (x vocabulary) sizes, one row each (e.g. "
  "64x8,256x4x2000); full: d_model 64, 256, 512, 1024 times K 1, 4, 8, 16; compile: K 1, 8, 16 "
  "times vocabulary 64, 2000, 20000 at d_model 64.",
)
flags.DEFINE_string(
  "coordinator_address",
  "",
  "Multi-process: host:port of process 0's coordinator (jax.distributed); "
  "not needed under SLURM (srun) or on a Cloud TPU VM slice, where it is found.",
)
flags.DEFINE_integer(
  "num_processes", 0, "Multi-process: the number of processes (one per host) with --coordinator_address."
)
flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index, 0 to --num_processes - 1.")
flags.DEFINE_string(
  "inject",
  "",
  "Testing: KIND@STEP plants a fault after global step STEP: sigterm, sigint or "
  "sigkill sent to this process, or nan (that step's loss); KIND@PHASE sends the signal as a phase "
  "begins: prepare, kmeans, estep, evaluate, report, bucket or llm_validation.",
)
flags.DEFINE_string(
  "compilation_cache",
  "",
  "Where compiled programs are kept between runs (JAX's persistent "
  "cache), so a second run or a resume does not compile them again: a directory, or none; default "
  "$HETLM_COMPILATION_CACHE, else ~/.cache/hetlm_jax/jax. bench always compiles afresh.",
)
flags.DEFINE_string("user", "", "generate: the user_id whose next session to generate.")
flags.DEFINE_integer("max_new", 20, "generate: tokens to generate at most (stops earlier at session end).")
flags.DEFINE_float("temperature", 0.0, "generate: 0 for greedy decoding, else the sampling temperature.")
flags.DEFINE_integer(
  "top_k", 0, "generate: sample among the k most likely tokens (0: all). predict: next pages listed per user (0: 10)."
)
flags.DEFINE_float("top_p", 1.0, "generate: sample within the smallest set holding this probability mass.")


def _define_config_flags() -> None:
  """One flag per chosen setting of config.py, with its default and help."""
  for section in SECTIONS:
    for field in options(section):
      name, default, help_text = flag_name(field), field.default, field.metadata["help"]
      if field.metadata["auto"] is not None:  # an integer, or "auto"
        flags.DEFINE_string(name, str(default), help_text)
        continue
      define = {
        bool: flags.DEFINE_boolean,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
      }[type(default)]
      define(name, default, help_text)


_define_config_flags()


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
      raise HetlmError(
        f"--sweep={text}: expected d_model x K (x vocabulary) sizes such as 64x8,256x4x2000, full or compile"
      )
    if size[0] < 8 or size[0] % 8 or size[1] < 1 or len(size) == 3 and size[2] < 16:
      raise HetlmError(
        f"--sweep={text}: {item} needs d_model a multiple of 8, K at least 1 and a vocabulary of at least 16"
      )
    sizes.append(size)
  return sizes


def config_from_flags() -> Config:
  """The Config of the parsed flags."""

  def value(field):
    flag = FLAGS[flag_name(field)].value
    return flag if field.metadata["auto"] is None else parse_auto(field, flag)

  return Config(**{section: kind(**{f.name: value(f) for f in options(section)}) for section, kind in SECTIONS.items()})


def _main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise HetlmError(f"expected a command ({' | '.join(COMMANDS)}), got {' '.join(argv[1:]) or 'none'}")
  if len(argv) > 2:
    raise HetlmError(f"unexpected arguments: {' '.join(argv[2:])}")
  cfg = config_from_flags()
  from hetlm_jax import interrupt

  interrupt.inject(FLAGS.inject)
  # One stop handler for the whole command, before anything is read: a signal stops it at the next safe point.
  from hetlm_jax import compilation

  compilation.setup("none" if argv[1] == "bench" else FLAGS.compilation_cache)  # bench measures compile time
  compilation.reset_counts()
  with interrupt.stop_handler() as stop:
    try:
      status = _command(argv[1], cfg, stop)
    except interrupt.Preempted as stopped:
      _say_stopped(
        f"{stopped.signal_name}: stopped at step {stopped.step} of {stopped.model}, with a checkpoint "
        "there. The same command resumes the run"
      )
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

    llm = cfg.llm if FLAGS["llm"].present else None  # else the run's own --llm, if it had one
    report = evaluate_workdir(FLAGS.workdir, data, llm)
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
  """The command line that resumes this run: the one typed, less the tests' --inject."""
  import shlex

  words = [word for word in _argv if not word.startswith("--inject")]
  return shlex.join(["hetlm", *words[1:]])


def _summary(report: dict, workdir: str) -> None:
  """The last three lines of train and evaluate: the models' held-out NLL, which is lowest, where to read on."""
  from hetlm_jax.files import location

  nll = {name: metrics["nll"]["mean"] for name, metrics in report.get("models", {}).items() if "nll" in metrics}
  lms = [name for name in ("hetlm", "single", "single_ft", "single_matched") if name in nll]
  print("held-out NLL (nats/token, mean over users): " + ", ".join(f"{name} {nll[name]:.4f}" for name in lms))
  if lms:
    best = min(lms, key=nll.get)
    note = " (HeTLM kept its warm-start LM: no HeTLM pass beat it)" if report.get("hetlm_is_init_lm") else ""
    print(f"lowest among the LMs: {best}{note}; per-user intervals and the other metrics are in the report")
  assignments = "assignments/" if (location(workdir) / "assignments").is_dir() else "assignments.parquet"  # workdir.py
  print(f"report: {location(workdir) / 'report.md'} (eval.json, {assignments} and checkpoints/ beside it)")


def _generate(data: str | None) -> int:
  if not FLAGS.user:
    raise HetlmError("generate needs --user=ID")
  if FLAGS.max_new < 1 or FLAGS.temperature < 0 or FLAGS.top_k < 0 or not 0 < FLAGS.top_p <= 1:
    raise HetlmError("--max_new must be ≥ 1, --temperature ≥ 0, --top_k ≥ 0 and --top_p in (0, 1]")
  from hetlm_jax.eval.generate import Sampling
  from hetlm_jax.pipeline import generate_for_user

  out = generate_for_user(
    FLAGS.workdir, FLAGS.user, data, Sampling(FLAGS.max_new, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  )
  print(f"user {out['user']} (cluster {out['cluster']})")
  for label in ("history", "generated", "actual"):
    print(f"{label + ':':11}{' '.join(out[label])}")
  return 0


def _process_share() -> tuple[int, int]:
  """(this process, processes) of a `hetlm predict` job: --process_id/--num_processes, else srun's task, else
  (0, 1). The processes need not talk to each other: each predicts its own chunks of users."""
  if FLAGS.num_processes > 1 or FLAGS.process_id >= 0:
    if FLAGS.num_processes < 1 or not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise HetlmError(
        f"--num_processes={FLAGS.num_processes} --process_id={FLAGS.process_id}: expected "
        "0 <= process_id < num_processes"
      )
    return FLAGS.process_id, FLAGS.num_processes
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
    return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
  return 0, 1


def _predict(data: str | None) -> int:
  if not data or not FLAGS.out:
    raise HetlmError("predict needs --data=EVENTS (the users to predict for) and --out=PREDICTIONS.parquet")
  from hetlm_jax.predict import predict_file

  process, processes = _process_share()
  s = predict_file(
    FLAGS.workdir,
    data,
    FLAGS.out,
    FLAGS.format,
    FLAGS.model,
    FLAGS.top_k or 10,
    FLAGS.mixture,
    FLAGS.chunk_users,
    FLAGS.outcome_samples,
    FLAGS.seed,
    process,
    processes,
    grouped=FLAGS.grouped,
    memory_mb=FLAGS.memory_mb,
    buckets=FLAGS.buckets,
  )
  shares = ", ".join(f"{c}: {n / max(s['users'], 1):.0%}" for c, n in enumerate(s["clusters"]))
  if s["mode"] == "file order":
    grouping = "read in file order (--grouped)"
  else:
    grouping = (
      "grouped by user in memory"
      if s["mode"] == "in memory"
      else f"grouped by user through {s['buckets']:,} bucket files (largest {s['largest_bucket_mib']:,.1f} MiB)"
    )
    if "bucket_events_per_s" in s:
      grouping += f", first pass {s['bucket_events_per_s']:,.0f} events/s"
  print(
    f"predicted {s['users']:,} users ({s['events']:,} events) in {s['seconds']:.1f}s, {s['users_per_s']:,.0f} users/s;"
    f" {grouping}"
  )
  rss = s["peak_rss_mib"]
  print(
    f"clusters (K={s['k']}): {shares}; history pages the models never saw: {s['unknown_pages']:,}; peak memory "
    f"{rss[-1] if rss else 0:,.0f} MiB ({rss[0] if rss else 0:,.0f} MiB after the first chunk)"
  )
  print(
    f"wrote {s['out']}"
    + (f" (part {process} of {processes}; _SUCCESS beside the parts once all are written)" if processes > 1 else "")
  )
  return 0


def _fail(message) -> int:
  message = str(message)
  flagfile = "ERROR:: Unable to open flagfile: "  # absl's wording, then the OSError's
  if message.startswith(flagfile):
    message = "--flagfile: cannot open " + re.sub(
      r"^\[Errno \d+\] (.*): '(.*)'$", r"\2 (\1)", message.removeprefix(flagfile)
    )
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
    print(
      f"hetlm: interrupted; what was saved is kept, and the same command resumes:\n  {resume_command()}",
      file=sys.stderr,
    )
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
    default = _COMMAND_DEFAULT.get((command, name), FLAGS[name].default)
    shown = str(default).lower() if isinstance(default, bool) else default
    shown = _DATA_DEFAULT[command] if name == "data" else shown
    return f"  --{name}={shown}\n      {_COMMAND_FLAG_HELP.get((command, name), FLAGS[name].help)}"

  lines = [f"usage: hetlm {command} [--flag=value ...]", "", _COMMANDS_HELP[command] + "."]
  if command in ("train", "bench"):  # evaluate and generate take the settings saved in the workdir
    for section in ("data", "model", "train", "cluster", "llm"):
      lines += ["", f"{_GROUPS[section]}:"] + [flag(flag_name(f)) for f in options(section)]
  lines += ["", "run:"] + [flag(name) for name in _RUN_FLAGS[command]]
  return "\n".join(lines)


def _asks_for_help(argv: list[str]) -> bool:
  return any(arg in _HELP_FLAGS for arg in argv[1:])


def _print_help(argv: list[str]) -> int:
  command = next((arg for arg in argv[1:] if arg in COMMANDS), None)
  try:
    print(help_text(command), flush=True)
  except BrokenPipeError:  # e.g. piped into head
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the rest of the process
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
