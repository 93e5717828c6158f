"""Stopping a run cleanly: SIGTERM and SIGINT (a preempted cloud job, Ctrl-C) ask the command to stop at its next
safe point. One handler (`stop_handler`) is installed for the whole command before anything is read. Inside
training the safe point is the end of the current step: the run saves a checkpoint there and exits 0, and the same
command resumes it (Preempted). Elsewhere (preparing the data, the initial k-means, evaluation, the report,
generate, bench, predict) it is the next `safe_point`: nothing is partly written there, since every output is
written to a temporary name and renamed (hetlm_jax/files.py), and the command exits 0 saying where it stopped
(Stopped). A second Ctrl-C stops at once. `--inject` plants a fault at a given step or phase (a real signal, or a
NaN loss) so the tests can check what happens."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax

from hetlm_jax import hosts
from hetlm_jax.errors import HetlmError

FAULTS = ("sigterm", "sigint", "sigkill", "nan")
# The phases outside a training step where --inject=KIND@PHASE sends its signal, as the phase begins.
PHASES = ("prepare", "kmeans", "estep", "evaluate", "report", "bucket", "llm_validation")
# With several processes, the hosts agree whether to stop every this many steps (a collective; one process
# checks its flag after every step).
SYNC_EVERY = 10


class Preempted(Exception):
  """Training stopped on a signal after a checkpoint at `step` of model family `model`."""

  def __init__(self, model: str, step: int, signal_name: str):
    super().__init__(f"{signal_name}: {model} stopped at step {step}")
    self.model, self.step, self.signal_name = model, step, signal_name


class Stopped(Exception):
  """A requested stop at a safe point outside a training step: `where` it stopped and what is `kept` on disk."""

  def __init__(self, signal_name: str, where: str, kept: str):
    super().__init__(f"{signal_name}: stopped {where}; {kept}")
    self.signal_name, self.where, self.kept = signal_name, where, kept


class NonFiniteLoss(HetlmError):
  """A training step's loss was NaN or infinite."""


_injected: tuple[str, int | str] | None = None


def inject(spec: str) -> None:
  """--inject=KIND@STEP (testing): after global step STEP, send this process SIGTERM, SIGINT or SIGKILL; or
  make step STEP's loss NaN. KIND@PHASE: send the signal as PHASE (one of PHASES) first begins. Empty: no fault."""
  global _injected
  if not spec:
    _injected = None
    return
  kind, _, at = spec.partition("@")
  step = at.isdigit() and int(at) >= 1
  if kind not in FAULTS or not (step or at in PHASES and kind != "nan"):
    raise HetlmError(
      f"--inject={spec}: expected KIND@STEP with KIND one of {', '.join(FAULTS)} and STEP >= 1, "
      f"or a signal at a phase ({', '.join(PHASES)}), e.g. sigterm@evaluate"
    )
  _injected = (kind, int(at) if step else at)


def nan_at(step: int) -> bool:
  """Whether the step that ends at global step `step` gets a NaN loss (--inject=nan@STEP)."""
  return _injected == ("nan", step)


def _send(kind: str) -> None:
  os.kill(os.getpid(), getattr(signal, kind.upper()))


def after_step(step: int) -> None:
  """Sends the injected signal, if any, once global step `step` is dispatched."""
  if _injected is not None and _injected[1] == step and _injected[0] != "nan":
    _send(_injected[0])


def at_phase(phase: str) -> None:
  """Sends the injected signal, if any, as `phase` begins (the first time only)."""
  global _injected
  if _injected is not None and _injected[1] == phase:
    kind, _injected = _injected[0], None
    _send(kind)


class StopRequest:
  """While entered (in the main thread), SIGTERM and SIGINT set a flag instead of ending the process."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def take_back(self) -> None:
    """Installs the handler again: jax.distributed.initialize starts a preemption notifier that takes SIGTERM
    for itself (and only logs it)."""
    if self._previous:
      for sig in self.SIGNALS:
        signal.signal(sig, self._handle)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.received = signal.Signals(signum).name

  def requested(self, step: int, boundary: bool = False) -> bool:
    """Whether to stop after `step`: the same answer on every process. `boundary`: every process is at the
    same point (e.g. the end of a pass), so they may agree now whatever the step."""
    if jax.process_count() == 1:
      return self.received is not None
    if not boundary and step % SYNC_EVERY:
      return False
    stop = hosts.any_process(self.received is not None)
    if stop and self.received is None:
      self.received = "SIGTERM (another process)"
    return stop


_active: StopRequest | None = None


@contextlib.contextmanager
def stop_handler():
  """The command's one StopRequest: entered by the outermost caller (the command line, or train_and_evaluate and
  the other entry points when called from Python); nested callers share it, so a signal at any moment is kept
  until the next safe point."""
  global _active
  if _active is not None:
    yield _active
    return
  with StopRequest() as stop:
    _active = stop
    try:
      yield stop
    finally:
      _active = None


def safe_point(where: str, kept: str) -> None:
  """Raises Stopped(where, kept) if a stop was requested, on any process: call it where every process of the
  job is at the same point and nothing is partly written."""
  if _active is not None and _active.requested(0, boundary=True):
    raise Stopped(_active.received, where, kept)
