"""Bad input never yields a traceback or a half-written workdir: one error line, exit status 2."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events

from hetlm_jax.main import cli

# The command line's own behaviour; --prox and --interpolate have their tests in test_policy.py, and leaving them
# out here spares every run two compilations.
TINY = [
  "--context=8",
  "--d_model=8",
  "--n_layers=1",
  "--n_heads=2",
  "--d_ff=16",
  "--epochs=1",
  "--batch_size=8",
  "--k=2",
  "--rounds=1",
  "--prox=0",
  "--nointerpolate",
]


def run(capsys, *args):
  code = cli(["hetlm", *args])
  captured = capsys.readouterr()
  run.out = captured.out.strip().splitlines()
  return code, captured.err.strip().splitlines()


def assert_refused(capsys, workdir, args, *needles):
  before = sorted(os.listdir(workdir)) if workdir.exists() else None
  code, err = run(capsys, "train", f"--workdir={workdir}", *TINY, *args)
  assert code == 2
  assert len(err) == 1 and err[0].startswith("hetlm: error: "), err
  for needle in needles:
    assert needle in err[0], err[0]
  after = sorted(os.listdir(workdir)) if workdir.exists() else None
  assert after == before, "the workdir was changed"


@pytest.fixture
def good_log(tmp_path):
  path = tmp_path / "good.parquet"
  pq.write_table(markov_events(n_users=20, n_groups=2, sessions=2, session_len=4)[0], path)
  return path


def test_missing_file(tmp_path, capsys):
  assert_refused(capsys, tmp_path / "run", [f"--data={tmp_path}/nope.parquet"], "nope.parquet")


def test_file_that_is_not_parquet(tmp_path, capsys):
  bad = tmp_path / "garbage.parquet"
  bad.write_bytes(os.urandom(300))
  assert_refused(capsys, tmp_path / "run", [f"--data={bad}"], "garbage.parquet")


def test_truncated_parquet(tmp_path, good_log, capsys):
  cut = tmp_path / "cut.parquet"
  cut.write_bytes(good_log.read_bytes()[: good_log.stat().st_size // 2])
  assert_refused(capsys, tmp_path / "run", [f"--data={cut}"], "cut.parquet")


def test_missing_column(tmp_path, capsys):
  path = tmp_path / "nopage.csv"
  path.write_text("user_id,timestamp\n1,10\n1,20\n")
  assert_refused(capsys, tmp_path / "run", [f"--data={path}"], "nopage.csv", "page")


def test_mistyped_timestamp_column(tmp_path, capsys):
  path = tmp_path / "badtime.csv"
  path.write_text("user_id,timestamp,page\n1,yesterday,a\n1,today,b\n")
  assert_refused(capsys, tmp_path / "run", [f"--data={path}"], "badtime.csv", "timestamp")


def test_null_user_ids(tmp_path, capsys):
  path = tmp_path / "nulls.parquet"
  pq.write_table(pa.table({"user_id": ["a", None, "a"], "timestamp": [1, 2, 3], "page": ["x", "y", "z"]}), path)
  assert_refused(capsys, tmp_path / "run", [f"--data={path}"], "nulls.parquet", "user_id")


def test_empty_table(tmp_path, capsys):
  path = tmp_path / "empty.csv"
  path.write_text("user_id,timestamp,page\n")
  assert_refused(capsys, tmp_path / "run", [f"--data={path}"], "empty.csv")


@pytest.mark.parametrize(
  "flag,needle",
  [
    ("--k=0", "--k"),
    ("--batch_size=0", "--batch_size"),
    ("--dropout=1.5", "--dropout"),
    ("--format=xml", "--format"),
    ("--k=abc", "--k"),
    ("--no_such_flag=1", "no_such_flag"),
    ("--k=100000", "--k"),
    ("--k=-1", "--k"),
    ("--rounds=0", "--rounds"),
    ("--init=magic", "--init"),
    ("--k_candidates=2,x", "--k_candidates"),
    ("--cluster_params=top:5", "--cluster_params"),
    ("--cluster_params=adapters", "--cluster_params"),
    ("--cluster_params=body", "--cluster_params"),
    ("--patience=-1", "--patience"),
    ("--val_frac=1.0", "--val_frac"),
  ],
)
def test_flag_out_of_range(tmp_path, good_log, capsys, flag, needle):
  assert_refused(capsys, tmp_path / "run", [f"--data={good_log}", flag], needle)


def test_existing_workdir_with_other_settings_is_left_untouched(tmp_path, good_log, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"model": {"d_model": 999}}')
  config_before = (workdir / "config.json").read_text()
  assert_refused(capsys, workdir, [f"--data={good_log}"], "--d_model")
  assert (workdir / "config.json").read_text() == config_before


def test_k_auto_without_validation_users_is_refused(tmp_path, good_log, capsys):
  assert_refused(
    capsys,
    tmp_path / "run",
    [f"--data={good_log}", "--k=auto", "--val_frac=0.001"],
    str(good_log),
    "--val_frac=0.001",
    "--k=auto",
  )


def test_unknown_command(capsys):
  code, err = run(capsys, "fly")
  assert code == 2 and len(err) == 1 and "fly" in err[0]


def test_train_command_writes_a_complete_workdir_that_keeps_its_provenance(tmp_path, good_log, capsys):
  workdir = tmp_path / "run"
  code, err = run(capsys, "train", f"--workdir={workdir}", f"--data={good_log}", *TINY)
  assert code == 0, err
  assert {"checkpoints", "tokenizer.json", "config.json", "metrics.jsonl", "assignments.parquet", "eval.json"} <= set(
    os.listdir(workdir)
  )
  steps = os.listdir(workdir / "checkpoints" / "hetlm")  # checkpoints/MODEL/STEP, nothing nested between
  assert steps and all(name.isdigit() for name in steps)
  assert run.out[-1].startswith(f"report: {workdir / 'report.md'}") and "held-out NLL" in run.out[-3]
  first = json.loads((workdir / "eval.json").read_text())
  assert first["train_s"]["hetlm"] > 0.01
  provenance = {key: first[key] for key in ("k", "rounds", "params", "train_s", "passes")}
  code, err = run(capsys, "train", f"--workdir={workdir}", f"--data={good_log}", *TINY)  # resumes a finished run
  assert code == 0, err
  assert {key: json.loads((workdir / "eval.json").read_text())[key] for key in provenance} == provenance
  code, err = run(capsys, "evaluate", f"--workdir={workdir}")
  assert code == 0, err
  assert {key: json.loads((workdir / "eval.json").read_text()).get(key) for key in provenance} == provenance


@pytest.mark.parametrize(
  "make,needle",
  [
    (lambda p: p.write_text("not a directory"), "is a file"),
    (lambda p: (p.parent / "file").write_text("x"), "which is a file"),
  ],
)
def test_a_workdir_that_cannot_be_a_directory_is_refused(tmp_path, good_log, capsys, make, needle):
  workdir = tmp_path / "run"
  make(workdir)
  target = workdir if workdir.exists() else tmp_path / "file" / "run"
  code, err = run(capsys, "train", f"--workdir={target}", f"--data={good_log}", *TINY)
  assert code == 2 and len(err) == 1 and err[0].startswith("hetlm: error: --workdir=") and needle in err[0], err


def test_an_unwritable_or_full_workdir_is_refused(tmp_path, good_log, capsys, monkeypatch):
  import shutil

  from hetlm_jax import workdir as run_dir

  monkeypatch.setattr(run_dir.os, "access", lambda path, mode: False)  # tests may run as root, who writes anywhere
  code, err = run(capsys, "train", f"--workdir={tmp_path / 'run'}", f"--data={good_log}", *TINY)
  assert code == 2 and "is not writable" in err[0] and not (tmp_path / "run").exists()
  monkeypatch.undo()
  full = shutil.disk_usage(tmp_path)._replace(free=10 * 2**20)
  monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: full)
  code, err = run(capsys, "train", f"--workdir={tmp_path / 'run'}", f"--data={good_log}", *TINY)
  assert code == 2 and "the disk is full" in err[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", ["head", "adapters:2"])
def test_train_with_a_shared_trunk_reports_its_parts_and_its_models_load_and_generate(tmp_path, good_log, capsys, spec):
  import jax

  from hetlm_jax.model import param_count
  from hetlm_jax.pipeline import generate_for_user, load_run

  workdir = tmp_path / "run"
  code, err = run(
    capsys,
    "train",
    f"--workdir={workdir}",
    f"--data={good_log}",
    *TINY,
    "--n_layers=2",
    "--d_model=16",
    "--d_ff=32",
    f"--cluster_params={spec}",
  )  # big enough to match within 10%
  assert code == 0, err
  report = json.loads((workdir / "eval.json").read_text())
  parts, params = report["hetlm_params"], report["params"]
  assert 0 < parts["per_cluster"] < parts["shared"]
  assert params["hetlm"] == parts["shared"] + 2 * parts["per_cluster"]
  assert abs(params["single_matched"] - params["hetlm"]) <= 0.1 * params["hetlm"]
  run_ = load_run(workdir)
  shared, own = (sum(x.size for x in jax.tree.leaves(run_.params[p])) for p in ("shared", "cluster"))
  assert (shared, own) == (parts["shared"], 2 * parts["per_cluster"])  # one shared copy, K stacked parts
  assert shared + own // 2 == param_count(run_.config.model)
  out = generate_for_user(workdir, "u0000")
  assert out["cluster"] in (0, 1) and out["history"][0] == "<s>"


BENCH_KEYS = (
  "device",
  "devices",
  "k",
  "batch",
  "seq_len",
  "params_per_model",
  "jax_version",
  "date",
  "vmapped_tokens_per_s",
  "loop_tokens_per_s",
  "torch_tokens_per_s",
  "torch_loop_tokens_per_s",
  "torch_func_tokens_per_s",
  "model_flops_per_token",
  "mfu",
  "score_users_per_s",
  "score_tokens_per_s",
  "prep_events_per_s",
  "padding_fraction",
  "host_wait_fraction",
  "predict_users_per_s",
  "predict_tokens_per_s",
  "eval_path_users_per_s",
  "score_host_s_per_million_users",
  "embed_host_s_per_million_users",
)


def test_bench_writes_every_measurement(tmp_path, good_log, capsys):
  out = tmp_path / "bench.json"
  code, err = run(
    capsys, "bench", f"--data={good_log}", *TINY, "--bench_steps=2", "--bench_k=2", "--sweep=8x1x16", f"--out={out}"
  )
  assert code == 0, err
  result = json.loads(out.read_text())
  assert set(BENCH_KEYS) <= set(result)
  assert (result["k"], result["batch"], result["seq_len"], result["devices"]) == (2, 8, 8, 4)
  for key in BENCH_KEYS[8:]:
    if not key.startswith("torch"):
      assert result[key] >= 0 if key.endswith("fraction") else result[key] > 0, key
  torch_figures = [result[key] for key in BENCH_KEYS if key.startswith("torch")]
  assert all(x is None for x in torch_figures) or all(x > 0 for x in torch_figures)
  assert result["padding_fraction"] < 1 and result["host_wait_fraction"] < 1
  [row] = result["sweep"]
  assert (row["k"], row["d_model"], row["vocab_size"]) == (1, 8, 16) and row["vmapped_tokens_per_s"] > 0
  assert row["mfu"] > 0
  for measured in (result, row):  # compile seconds of both ways of stacking, the loop's step and scoring
    assert set(measured["compile_s"]) == {"unroll", "vmap", "loop"} and all(
      s > 0 for s in measured["compile_s"].values()
    ), measured["compile_s"]
    stack = "unroll" if measured["k"] == 1 else "vmap"  # --stack=auto's rule on a CPU
    assert measured["stack"] == stack and measured["vmapped_step_s"] == measured["stacked_step_s"][stack]
  assert result["score_compile_s"] > 0


def test_bench_without_torch_leaves_its_figures_null(tmp_path, good_log, capsys, monkeypatch):
  from hetlm_jax.bench import torch_reference

  monkeypatch.setattr(torch_reference, "available", lambda: "PyTorch is not installed (test)")
  out = tmp_path / "bench.json"
  code, err = run(capsys, "bench", f"--data={good_log}", *TINY, "--bench_steps=1", "--bench_k=2", f"--out={out}")
  assert code == 0, err
  result = json.loads(out.read_text())
  assert result["torch_tokens_per_s"] is None and "not installed" in result["torch_missing"]


def test_the_default_preset_holds_the_built_in_defaults():
  from hetlm_jax.config import Config

  defaults = {name: value for section in Config().to_dict().values() for name, value in section.items()}
  with open("configs/default.flags") as f:
    lines = [ln.strip() for ln in f if ln.startswith("--")]
  assert lines
  for line in lines:
    name, _, value = line[2:].partition("=")
    if name not in defaults and name.startswith("no"):  # --noflag sets a boolean to False
      assert value == "" and defaults[name[2:]] is False, line
      continue
    expected = defaults[name]
    if isinstance(expected, bool):
      assert value == "" and expected, line  # a bare --flag sets a boolean
    else:
      assert type(expected)(value) == expected, line


def test_help_lists_the_commands_and_each_commands_flags_grouped_with_sentences_and_defaults(capsys):
  code, _ = run(capsys, "--help")
  assert code == 0 and all(
    any(line.strip().startswith(name) for line in run.out)
    for name in ("train", "evaluate", "generate", "predict", "bench")
  )
  code, _ = run(capsys, "train", "--help")
  assert code == 0
  text = "\n".join(run.out)
  for group in ("data:", "model:", "training:", "clustering:", "run:"):
    assert f"\n{group}\n" in text
  flag_lines = [i for i, line in enumerate(run.out) if line.startswith("  --")]
  assert len(flag_lines) > 40
  for i in flag_lines:
    sentence = run.out[i + 1].strip()
    assert "=" in run.out[i] and sentence[0].isupper() and sentence.endswith((".", ")")), run.out[i : i + 2]
  assert "  --k=4" in run.out and "  --dtype=auto" in run.out and "  --tie_embeddings=true" in run.out
  assert "  --data=(the packaged msnbc sample)" in run.out and "--inject" not in text  # a test-only flag, hidden
  for command, shown in (
    ("evaluate", "  --data=(the run's own data)"),
    ("bench", "  --bench_k=8"),
    ("predict", "  --data=(required)"),
  ):
    code, _ = run(capsys, command, "--help")
    assert code == 0 and shown in run.out, (command, run.out)
  code, _ = run(capsys, "generate", "-h")
  assert code == 0 and "  --user=" in run.out and "model:" not in run.out
  code, _ = run(capsys, "predict", "-h")
  assert code == 0 and "  --chunk_users=4096" in run.out and "  --out=" in run.out and "model:" not in run.out


def test_tensorboard_writes_one_run_per_model_with_the_training_and_validation_scalars(tmp_path, good_log, capsys):
  from tensorboard_events import scalars

  workdir = tmp_path / "run"
  code, err = run(
    capsys, "train", f"--workdir={workdir}", f"--data={good_log}", *TINY, "--tensorboard", "--log_every=1"
  )
  assert code == 0, err
  # `single` is the init LM (trained once, as init_single); single_ft is fine-tuned from it
  assert {"hetlm", "init_single", "single_ft", "single_matched"} <= set(os.listdir(workdir / "tensorboard"))
  tags = scalars(workdir / "tensorboard" / "hetlm")
  assert {"train/loss", "train/tokens_per_s", "train/learning_rate"} <= set(tags)
  steps = [step for step, _ in tags["train/loss"]]
  assert steps == sorted(steps) and len(steps) >= 2


def test_a_missing_flagfile_is_one_plain_line(capsys):
  code, err = run(capsys, "train", "--flagfile=configs/no_such.flags")
  assert code == 2 and err == [
    "hetlm: error: --flagfile: cannot open configs/no_such.flags (No such file or directory)"
  ]


def test_the_log_keeps_out_jaxs_search_for_absent_backends_and_orbaxs_chatter_but_not_warnings():
  import logging

  from hetlm_jax.main import _QuietLibraries

  record = lambda level, path, text: logging.LogRecord("x", level, path, 1, text, (), None)
  keep = _QuietLibraries().filter
  assert not keep(record(logging.INFO, "jax/_src/xla_bridge.py", "Unable to initialize backend 'tpu': INTERNAL: ..."))
  assert not keep(record(logging.INFO, "orbax/checkpoint/manager.py", "Saving checkpoint"))
  assert keep(record(logging.INFO, "hetlm_jax/pipeline.py", "data: 120 users"))
  assert keep(record(logging.WARNING, "orbax/checkpoint/manager.py", "disk almost full"))
