"""The README's code blocks as a user pastes them: every `hetlm` command line parses as written, and the blocks
that use the main job's run (`runs/default`) run literally, relative paths included, from a directory laid out
as the repository root after the main job (a tiny run of the packaged sample trained into runs/default)."""

import json
import re
import shlex
import textwrap

import pyarrow.parquet as pq
from absl import flags
from tiny_run import REPO

from hetlm_jax.data import SAMPLE_PATH
from hetlm_jax.data.readers import read_events
from hetlm_jax.main import COMMANDS, cli

README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
  """The README's ```LANGUAGE blocks, dedented (some sit inside a list item)."""
  return [
    textwrap.dedent(b) for b in re.findall(rf"^( *)```{language}\n(.*?)^\1```", README, re.S | re.M) for b in [b[1]]
  ]


def _command_lines() -> list[list[str]]:
  """Every `hetlm ...` or `python -m hetlm_jax ...` command in the bash blocks, as its words after the program."""
  commands = []
  for block in _blocks("bash"):
    for line in block.splitlines():
      lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")  # comments dropped, ; and && apart
      lexer.whitespace_split = True
      parts = [[]]
      for word in lexer:
        if word in (";", "&&", "||", "|"):
          parts.append([])
        else:
          parts[-1].append(word)
      for words in parts:
        for program in (["hetlm"], ["python", "-m", "hetlm_jax"]):
          at = next((i for i in range(len(words)) if words[i : i + len(program)] == program), None)
          if at is not None:
            commands.append(words[at + len(program) :])
            break
  return commands


def test_every_hetlm_command_in_the_readme_is_a_command_with_flags_that_exist(monkeypatch):
  monkeypatch.chdir(REPO)  # --flagfile=configs/... is relative to the repository root
  commands = _command_lines()
  assert len(commands) >= 10, commands
  for words in commands:
    if "--help" in words:
      continue
    flags.FLAGS.unparse_flags()
    rest = flags.FLAGS(["hetlm", *words])  # raises on an unknown flag or a bad value
    assert rest[1:] == words[:1] and words[0] in COMMANDS, f"not pasteable as written: hetlm {shlex.join(words)}"
  flags.FLAGS.unparse_flags()


def test_the_blocks_on_the_main_jobs_run_run_as_written_from_the_repository_root(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert (
    cli(
      [
        "hetlm",
        "train",
        "--workdir=runs/default",
        "--max_users=400",
        "--context=16",
        "--d_model=16",
        "--n_layers=1",
        "--n_heads=2",
        "--d_ff=32",
        "--epochs=2",
        "--batch_size=8",
        "--k=2",
        "--rounds=1",
        "--init=random",
        "--nobaselines",
        "--eval_batch_size=64",
      ]
    )
    == 0
  )
  assert json.loads((tmp_path / "runs/default/sessions.json").read_text())["session_ends"] is False  # msnbc
  # A user's recent log, for `hetlm predict`: the sample's events of 50 users.
  events = read_events(str(SAMPLE_PATH), "auto", max_users=50)
  pq.write_table(events.drop_columns([c for c in events.column_names if c.startswith("_")]), "recent.parquet")

  python = {" ".join(b.split()[:6]): b for b in _blocks("python")}
  orbax = next(b for b in python.values() if "ocp.CheckpointManager" in b)
  namespace = {}
  exec(compile(orbax, "README.md", "exec"), namespace)
  assert namespace["params"]["cluster"]["embed"]["embedding"].shape[0] == 2  # K=2 stacked models

  example = next(b for b in python.values() if "Predictor.load" in b)
  namespace = {}
  exec(compile(example, "README.md", "exec"), namespace)
  top = namespace["top"]
  assert len(top.pages) == 2 and all(len(p) == 5 for p in top.pages) and top.probs.shape == (2, 5)
  assert "| cluster " in capsys.readouterr().out

  predict = [words for words in _command_lines() if words[0] == "predict" and "--workdir=runs/default" in words]
  assert predict, "the README's predict command on the main job's run"
  for words in predict:
    assert cli(["hetlm", *words]) == 0, words
  assert pq.read_table("predictions.parquet").num_rows == 50


def test_the_readmes_predict_section_and_hetlm_predict_help_give_the_same_defaults():
  from hetlm_jax.main import help_text

  section = README[README.index("For a whole log:") :]
  section = section[: section.index("\n#")]
  mentioned = dict(re.findall(r"--([a-z_]+)=([0-9]+)\b", section))
  assert {"top_k", "outcome_samples", "chunk_users"} <= set(mentioned), mentioned
  shown = help_text("predict")
  for name, value in mentioned.items():
    assert f"  --{name}={value}\n" in shown, (name, value)
  data_help = shown[shown.index("  --data=") :].split("\n")[1]
  assert (
    "(required)" in shown and "packaged" not in data_help and "bench" not in shown.split("--out=")[1].split("\n")[1]
  )
