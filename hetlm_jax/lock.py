"""One writer per workdir, held while a command writes there.

On a local (or shared POSIX) filesystem: an exclusive advisory lock (fcntl.flock) on WORKDIR/.lock. The OS drops
it when the holder exits or is killed, so a crashed run never leaves a stale lock; the file itself only names the
last holder (pid, host, command, start) for the refusal message.

On an object store (gs://, s3://), which has no flock: the object WORKDIR/.lock, created only if it does not exist
(fsspec's exclusive mode "xb": s3 `If-None-Match: *`, gs `ifGenerationMatch=0`), naming its holder. The holder
rewrites it every HEARTBEAT_S seconds and deletes it when it ends; a lock whose object was not rewritten for
$HETLM_LOCK_STALE_S seconds (default 600: its holder was killed) is taken over with a message. Where the store
cannot create an object only if absent, the run says in one line that it cannot guard the workdir, and goes on.
Limits: a store that ignores the precondition cannot be told from one that honours it; and two runs that take over
the same stale lock at the same moment may both start (the loser's heartbeat then logs that its lock was taken):
removing the stale object only if unchanged needs a conditional delete that fsspec does not offer."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from absl import logging

from hetlm_jax.errors import HetlmError, one_line
from hetlm_jax.files import Location, filesystem, is_uri

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
    os.pwrite(fd, _content(self.command), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _holder(fd: int) -> str:
  try:
    return _named(os.pread(fd, 4096, 0))
  except OSError:
    return "holder unknown"


def _named(content: bytes) -> str:
  """The holder a lock's content names."""
  try:
    info = json.loads(content or b"{}")
    return f"hetlm {info['command']}, pid {info['pid']} on {info['host']}, since {info['since']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"


def _content(command: str, token: str = "") -> bytes:
  info = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "command": command,
    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  return json.dumps({**info, "token": token} if token else info).encode() + b"\n"


HEARTBEAT_S = 60.0  # how often the holder of an object-store lock rewrites it
STALE_S = 600.0  # an object-store lock not rewritten for this long is taken over ($HETLM_LOCK_STALE_S)


class ObjectLock:
  """`with ObjectLock(workdir, "train"):` holds a workdir on an object store (see the module docstring); a second
  holder is refused with one HetlmError naming the first, and nothing in the workdir is changed."""

  def __init__(self, workdir: Location, command: str):
    self.workdir, self.command = workdir, command
    self._fs, self._key = filesystem(f"{os.fspath(workdir).rstrip('/')}/{LOCK_FILE}")
    self._token = uuid.uuid4().hex
    self._content = _content(command, self._token)
    self._stop, self._beat, self._held = threading.Event(), None, False

  def __enter__(self) -> ObjectLock:
    stale_s = float(os.environ.get("HETLM_LOCK_STALE_S", STALE_S))
    for attempt in range(2):
      try:
        with self._fs.open(self._key, "xb") as f:
          f.write(self._content)
        break
      except FileExistsError:
        pass
      except (ValueError, NotImplementedError, TypeError) as e:  # the store cannot write only if absent
        logging.warning(
          "--workdir=%s: this store cannot create an object only if it is absent (%s), so the workdir is not "
          "guarded against a second run; make sure only one run writes there",
          self.workdir,
          one_line(e),
        )
        return self
      holder, age = self._holder()
      if age is None or age < stale_s or attempt:
        raise HetlmError(
          f"--workdir={self.workdir}: another run is writing there ({holder}"
          + (
            f"; its lock was rewritten {age:.0f} s ago and is taken over after {stale_s:.0f} s"
            if age is not None
            else ""
          )
          + "); wait for it to end, or use another --workdir"
        )
      logging.warning(
        "--workdir=%s: taking over the lock of %s, not rewritten for %.0f s (over %.0f s: its run was stopped "
        "without releasing it)",
        self.workdir,
        holder,
        age,
        stale_s,
      )
      self._fs.rm(self._key)
    self._held = True
    self._beat = threading.Thread(target=self._heartbeat, name="hetlm-lock-heartbeat", daemon=True)
    self._beat.start()
    return self

  def _holder(self) -> tuple[str, float | None]:
    """Who holds the lock, and how long ago its object was last written (None: it is gone, or unreadable)."""
    try:
      content = self._fs.cat_file(self._key)
      age = time.time() - self._fs.modified(self._key).timestamp()
    except (OSError, ValueError):
      return "holder unknown", None
    return _named(content), max(age, 0.0)

  def _token_there(self) -> str | None:
    """The token of the lock object there now (None: it is gone or not a hetlm lock); OSError if unreadable."""
    try:
      content = self._fs.cat_file(self._key)
    except FileNotFoundError:
      return None
    try:
      return json.loads(content).get("token")
    except (ValueError, AttributeError):
      return None

  def _heartbeat(self) -> None:
    while not self._stop.wait(float(os.environ.get("HETLM_LOCK_HEARTBEAT_S", HEARTBEAT_S))):
      try:
        if self._token_there() != self._token:
          logging.error("--workdir=%s: this run's lock was removed or taken over by another run", self.workdir)
          return
        self._fs.pipe_file(self._key, self._content)
      except OSError as e:  # the store is out of reach for now: the next beat tries again
        logging.warning("--workdir=%s: the lock could not be rewritten (%s)", self.workdir, one_line(e))

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._beat is not None:
      self._beat.join()
    try:
      if self._held and self._token_there() == self._token:
        self._fs.rm(self._key)
    except OSError as e:
      logging.warning(
        "--workdir=%s: the lock could not be removed (%s); the next run takes it over after %.0f s",
        self.workdir,
        one_line(e),
        float(os.environ.get("HETLM_LOCK_STALE_S", STALE_S)),
      )
    self._held = False


def workdir_lock(workdir: Location, command: str) -> WorkdirLock | ObjectLock:
  """The lock of `workdir`: flock on a filesystem, a lock object on an object store."""
  return ObjectLock(workdir, command) if is_uri(workdir) else WorkdirLock(Path(workdir), command)


def hold(stack, workdir: Location, command: str) -> None:
  """Process 0 takes the workdir's lock for as long as `stack` (a contextlib.ExitStack) is open; when it is refused,
  every process of the job raises, at the same point."""
  from hetlm_jax import hosts  # JAX starts only once a command runs

  refusal = None
  if hosts.is_primary():
    try:
      stack.enter_context(workdir_lock(workdir, command))
    except HetlmError as e:
      refusal = e
  if hosts.any_process(refusal is not None):
    raise refusal or HetlmError(f"--workdir={workdir}: another run is writing there (process 0 was refused its lock)")
