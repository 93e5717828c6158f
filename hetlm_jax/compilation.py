"""Compiling: JAX's persistent compilation cache, on by default, and where a slow start went.

Every run compiles one program per model family, per scoring function and per evaluation shape; the cache keeps
the compiled programs on disk (`--compilation_cache`, default `$HETLM_COMPILATION_CACHE` or
~/.cache/hetlm_jax/jax), so a second identical run, or a resume, loads them instead. Programs that compile in
under MIN_COMPILE_S are not cached. Every compile of at least LOG_COMPILE_S is logged with its function's name
and time (a function compiles once per shape: each model family's step is its own program), and `summary()` tells
the totals (how much came from the cache)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import jax
from absl import logging

ENV = "HETLM_COMPILATION_CACHE"
MIN_COMPILE_S = 0.1  # JAX's default is 1 s; CPU runs compile many programs of 0.1 to 1 s each
LOG_COMPILE_S = 1.0
_COMPILE = "/jax/core/compile/backend_compile_duration"  # XLA compiles, or loads from the cache, one program
_HIT = "/jax/compilation_cache/cache_hits"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def default_dir() -> Path:
  """Where the cache lives unless told: $HETLM_COMPILATION_CACHE, else the user's cache directory."""
  if os.environ.get(ENV):
    return Path(os.environ[ENV]).expanduser()
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetlm_jax" / "jax"


class _Stats:
  def __init__(self):
    self.seconds = defaultdict(float)  # function name → compile (or cache load) seconds, over the run
    self.programs = 0
    self.hits = 0
    self.saved_s = 0.0

  def duration(self, event: str, seconds: float, **kwargs) -> None:
    if event == _SAVED:
      self.saved_s += seconds
    if event != _COMPILE:
      return
    name = kwargs.get("fun_name") or "?"
    self.seconds[name] += seconds
    self.programs += 1
    if seconds >= LOG_COMPILE_S:
      logging.info("compiled %s in %.1fs", name, seconds)

  def event(self, event: str, **kwargs) -> None:
    if event == _HIT:
      self.hits += 1


_stats: _Stats | None = None
_cache_set: str | None = None


def setup(spec: str = "") -> Path | None:
  """--compilation_cache: '' (default_dir()), a directory, or 'none'; returns the directory used. Also starts
  counting compiles for the log. Call before anything compiles."""
  global _stats, _cache_set
  if _stats is None:
    _stats = _Stats()
    jax.monitoring.register_event_duration_secs_listener(_stats.duration)
    jax.monitoring.register_event_listener(_stats.event)
  path = None if spec.strip().lower() == "none" else Path(spec).expanduser() if spec else default_dir()
  if path is not None:
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      logging.warning("--compilation_cache=%s: %s; compiling without a cache", path, e.strerror)
      path = None
  setting = str(path) if path else "none"
  if setting != _cache_set:
    if _cache_set is not None:  # a second command in one process (the tests) with another cache
      try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
      except (ImportError, AttributeError):
        pass
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
      jax.config.update("jax_compilation_cache_dir", str(path))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    _cache_set = setting
  return path


def summary() -> str | None:
  """One line: compile seconds over the command, programs, those loaded from the cache; None before setup."""
  if _stats is None or not _stats.programs:
    return None
  slowest = max(_stats.seconds, key=_stats.seconds.get)
  return (
    f"compiling: {sum(_stats.seconds.values()):.1f}s for {_stats.programs} programs ({_stats.hits} loaded from "
    f"the cache, saving {_stats.saved_s:.1f}s); slowest {slowest} {_stats.seconds[slowest]:.1f}s"
  )


def reset_counts() -> None:
  """Starts the counts again (each command of a process that runs several, as the tests do)."""
  if _stats is not None:
    _stats.seconds.clear()
    _stats.programs = _stats.hits = 0
    _stats.saved_s = 0.0
