"""metrics.jsonl and the progress line (with ETA) that long work prints."""

from __future__ import annotations

import json
import os
import sys
import time

from absl import logging

from hetlm_jax import hosts
from hetlm_jax.files import Location, is_uri, location, replace_text

REWRITE_S = 30.0  # on an object store, metrics.jsonl is rewritten whole at most this often between train records


class MetricsLog:
  """Appends one JSON object per logged step or round; with `tensorboard_dir`, also TensorBoard scalars of the
  training and validation records, one run (subdirectory) per model. Records are also kept in memory, after
  those of earlier sessions of the run: in a multi-process job only process 0 writes the file, and every
  process reads the same records.

  An object store cannot append: there the file is rewritten whole (one PUT, readable while the run goes on) after
  every record but train steps', after those when REWRITE_S seconds have passed since the last rewrite, and on
  `close` (which a run's end and a stop both call)."""

  def __init__(self, path: Location, tensorboard_dir: Location | None = None):
    self._path = location(path)
    self._tb_dir, self._writers, self._validations = tensorboard_dir, {}, {}
    self._primary = hosts.is_primary()
    text = self._path.read_text() if self._path.exists() else ""
    self._records = parse_records(text)
    self._cut = bool(text) and not text.endswith("\n")  # the last line was cut short: start a new one
    self._remote, self._pending, self._rewritten = is_uri(self._path), False, time.monotonic()

  def write(self, record: dict) -> None:
    """Appends `record` (by process 0; every process keeps it in memory), and its TensorBoard scalars."""
    line = json.dumps(record, default=float)
    self._records.append(json.loads(line))
    if not self._primary:
      return
    if self._remote:
      self._pending = True
      if record.get("kind") != "train" or time.monotonic() - self._rewritten >= REWRITE_S:
        self._rewrite()
    else:
      with self._path.open("a") as f:
        f.write("\n" * self._cut + line + "\n")
    self._cut = False
    if self._tb_dir is not None and record.get("kind") in ("train", "validation") and "model" in record:
      self._scalars(record)

  def _scalars(self, record: dict) -> None:
    model = record["model"]
    if model not in self._writers:
      from tensorboardX import SummaryWriter  # checked by tensorboard_available() before the run starts

      self._writers[model] = SummaryWriter(logdir=f"{os.fspath(self._tb_dir).rstrip('/')}/{model}")
    writer = self._writers[model]
    if record["kind"] == "train":
      for key in ("loss", "perplexity", "tokens_per_s", "learning_rate", "step_time_s"):
        writer.add_scalar(f"train/{key}", record[key], record["step"])
    else:  # validation after every pass: x is the pass counted over all rounds
      self._validations[model] = self._validations.get(model, 0) + 1
      writer.add_scalar("validation/nll", record["nll"], self._validations[model])
    writer.flush()

  def _rewrite(self) -> None:
    """The whole object again, from the records (what a line cut short by a kill held is left out)."""
    replace_text(self._path, "".join(json.dumps(record) + "\n" for record in self._records))
    self._pending, self._rewritten = False, time.monotonic()

  def close(self) -> None:
    """Writes what is not yet on an object store, and closes the TensorBoard writers (again: nothing)."""
    if self._pending:
      self._rewrite()
    for writer in self._writers.values():
      writer.close()
    self._writers = {}

  def records(self, kind: str) -> list[dict]:
    """The logged records of one kind, in order (earlier sessions of a resumed run included)."""
    return [r for r in self._records if r.get("kind") == kind]


def parse_records(text: str) -> list[dict]:
  """The records of metrics.jsonl's `text`, less blank lines and one cut short (a process killed writing it)."""
  return [record for record in map(_parsed, text.splitlines()) if record is not None]


def _parsed(line: str) -> dict | None:
  try:
    return json.loads(line) if line.strip() else None
  except json.JSONDecodeError:
    return None


def tensorboard_available() -> str | None:
  """None if tensorboardX imports, else why not."""
  import importlib.util

  if importlib.util.find_spec("tensorboardX") is None:
    return (
      "--tensorboard needs tensorboardX: pip install tensorboardX (or pip install -e '.[tensorboard]' in the "
      "repository)"
    )
  return None


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:d}:{rem % 60:02d}"


class Progress:
  """A redrawn line on a terminal; a log line every `every` updates otherwise."""

  def __init__(self, total: int, label: str, every: int = 50, stream=None, initial: int = 0):
    self.total, self.label, self.every = max(total, 1), label, max(every, 1)
    self._stream = stream or sys.stderr
    self._tty = getattr(self._stream, "isatty", lambda: False)() and hosts.is_primary()
    self._start, self._initial = time.perf_counter(), initial

  def update(self, done: int, info: str = "") -> None:
    """Shows `done` of the total, with the elapsed time, the ETA and `info`."""
    if self.label is None:  # quiet: a pass inside a job that shows its own progress
      return
    elapsed = time.perf_counter() - self._start
    eta = elapsed / max(done - self._initial, 1) * (self.total - done)
    line = f"{self.label} {done}/{self.total} [{_duration(elapsed)}<{_duration(eta)}] {info}".rstrip()
    if self._tty:
      self._stream.write("\r\033[K" + line)
      self._stream.flush()
    elif done % self.every == 0 or done == self.total:
      logging.info(line)

  def close(self) -> None:
    """Ends the redrawn line."""
    if self._tty:
      self._stream.write("\n")
      self._stream.flush()
