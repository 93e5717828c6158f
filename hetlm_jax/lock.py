"""One writer per workdir: an exclusive advisory lock (fcntl.flock) on WORKDIR/.lock, held while a command writes
there. The OS drops it when the holder exits or is killed, so a crashed run never leaves a stale lock; the file
itself only names the last holder (pid, host, command, start) for the refusal message."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hetlm_jax.errors import HetlmError

LOCK_FILE = ".lock"


class WorkdirLock:
  """`with WorkdirLock(workdir, "train"):` holds the workdir (made if missing); a second holder is refused with
  one HetlmError naming the first one's pid and host, and nothing in the workdir is changed."""

  def __init__(self, workdir: Path, command: str):
    self.workdir, self.command, self._fd = Path(workdir), command, None

  def __enter__(self) -> WorkdirLock:
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise HetlmError(
        f"--workdir={self.workdir}: another run is writing there ({holder}); wait for it to end, "
        "or use another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(
      fd,
      json.dumps(
        {
          "pid": os.getpid(),
          "host": socket.gethostname(),
          "command": self.command,
          "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
      ).encode()
      + b"\n",
      0,
    )
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    return f"hetlm {info['command']}, pid {info['pid']} on {info['host']}, since {info['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"


def hold(stack, workdir: Path, command: str) -> None:
  """Process 0 takes the workdir's lock for as long as `stack` (a contextlib.ExitStack) is open; when it is refused,
  every process of the job raises, at the same point."""
  from hetlm_jax import hosts  # JAX starts only once a command runs

  refusal = None
  if hosts.is_primary():
    try:
      stack.enter_context(WorkdirLock(workdir, command))
    except HetlmError as e:
      refusal = e
  if hosts.any_process(refusal is not None):
    raise refusal or HetlmError(f"--workdir={workdir}: another run is writing there (process 0 was refused its lock)")
