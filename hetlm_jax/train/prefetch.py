"""The input pipeline's last stage: batches built and put on the devices ahead of the step, in a thread."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable


class Prefetcher:
  """Yields `put(make(s))` for s in [first, until), in order, while a background thread builds up to
  `depth` batches ahead (double buffering with depth 2), so the step does not wait for numpy packing
  or the host-to-device copy. `wait_s` is the time the consumer spent waiting for a batch. depth 0:
  built in the consumer's thread. An error in the thread is raised in the consumer."""

  def __init__(
    self, make: Callable[[int], tuple], put: Callable[[tuple], tuple], first: int, until: int, depth: int = 2
  ):
    self._make, self._put, self._first, self._until, self._depth = make, put, first, until, depth
    self.wait_s = 0.0
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._thread = None
    if depth > 0:
      self._thread = threading.Thread(target=self._fill, name="hetlm-prefetch", daemon=True)
      self._thread.start()

  def _fill(self) -> None:
    try:
      for s in range(self._first, self._until):
        item = (True, self._put(self._make(s)))
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
    except BaseException as error:  # any error: handed to the consumer, which raises it
      self._queue.put((False, error))

  def __iter__(self):
    try:
      for s in range(self._first, self._until):
        start = time.perf_counter()
        if self._thread is None:
          batch = self._put(self._make(s))
        else:
          ok, batch = self._queue.get()
          if not ok:
            raise batch
        self.wait_s += time.perf_counter() - start
        yield batch
    finally:
      self.close()

  def close(self) -> None:
    """Stops the thread (e.g. when the consumer leaves early) and drops what it built."""
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        with contextlib.suppress(queue.Empty):
          self._queue.get(timeout=0.1)
      self._thread = None
