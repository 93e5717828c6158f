"""Stopping a run cleanly: SIGTERM and SIGINT (a preempted cloud job, Ctrl-C) ask training to stop after the
current step; the run saves a checkpoint there and exits 0, and the same command resumes it. `--inject` plants a
fault at a given step (a real signal, or a NaN loss) so the tests can check what happens."""

from __future__ import annotations

import os
import signal
import threading

import jax

from hetlm_jax import hosts
from hetlm_jax.errors import HetlmError

FAULTS = ("sigterm", "sigint", "sigkill", "nan")
# With several processes, the hosts agree whether to stop every this many steps (a collective; one process
# checks its flag after every step).
SYNC_EVERY = 10


class Preempted(Exception):
  """Training stopped on a signal after a checkpoint at `step` of model family `model`."""

  def __init__(self, model: str, step: int, signal_name: str):
    super().__init__(f"{signal_name}: {model} stopped at step {step}")
    self.model, self.step, self.signal_name = model, step, signal_name


class Stopped(Exception):
  """A job that keeps nothing partial (hetlm predict) stopped on a signal after `done` users, having written
  nothing."""

  def __init__(self, signal_name: str, done: int):
    super().__init__(f"{signal_name}: stopped after {done} users")
    self.signal_name, self.done = signal_name, done


class NonFiniteLoss(HetlmError):
  pass


_injected: tuple[str, int] | None = None


def inject(spec: str) -> None:
  """--inject=KIND@STEP (testing): after global step STEP, send this process SIGTERM, SIGINT or SIGKILL; or
  make step STEP's loss NaN. Empty: no fault."""
  global _injected
  if not spec:
    _injected = None
    return
  kind, _, step = spec.partition("@")
  if kind not in FAULTS or not step.isdigit() or int(step) < 1:
    raise HetlmError(f"--inject={spec}: expected KIND@STEP with KIND one of {', '.join(FAULTS)} and STEP >= 1")
  _injected = (kind, int(step))


def nan_at(step: int) -> bool:
  """Whether the step that ends at global step `step` gets a NaN loss (--inject=nan@STEP)."""
  return _injected == ("nan", step)


def after_step(step: int) -> None:
  """Sends the injected signal, if any, once global step `step` is dispatched."""
  if _injected is not None and _injected[1] == step and _injected[0] != "nan":
    os.kill(os.getpid(), getattr(signal, _injected[0].upper()))


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

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
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
