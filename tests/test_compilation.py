"""The persistent compilation cache: on by default, where it is said to be, off with `none`; a second identical
run loads its large programs from it instead of compiling them, and the log says where compile time went."""

import os
import re

import jax
from tiny_run import hetlm_process, train_args, write_log

from hetlm_jax import compilation


def test_the_cache_directory_follows_the_flag_the_environment_and_the_users_cache(tmp_path, monkeypatch):
  try:
    monkeypatch.delenv(compilation.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.setup() == tmp_path / "xdg" / "hetlm_jax" / "jax" and (tmp_path / "xdg").is_dir()
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == str(
      tmp_path / "xdg" / "hetlm_jax" / "jax"
    )
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compilation.MIN_COMPILE_S
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "env"))
    assert compilation.setup() == tmp_path / "env"
    assert compilation.setup(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compilation.setup("none") is None and not jax.config.jax_enable_compilation_cache
    (tmp_path / "file").write_text("")
    assert compilation.setup(str(tmp_path / "file" / "cache")) is None  # unusable: a warning, no cache
  finally:
    monkeypatch.undo()
    compilation.setup()  # the session's cache again


def test_a_second_identical_run_loads_its_large_programs_from_the_cache(tmp_path):
  log = write_log(tmp_path / "log.parquet")
  cache_flag = f"--compilation_cache={tmp_path / 'cache'}"
  first = hetlm_process([*train_args(log, tmp_path / "one"), cache_flag])
  assert first.returncode == 0, first.stderr[-3000:]
  cached = set(os.listdir(tmp_path / "cache"))
  assert cached, "nothing was cached"
  second = hetlm_process([*train_args(log, tmp_path / "two"), cache_flag])
  assert second.returncode == 0, second.stderr[-3000:]
  assert cached <= set(os.listdir(tmp_path / "cache"))
  said = {
    run: re.search(r"compiling: ([\d.]+)s for (\d+) programs \((\d+) loaded from the cache", run.stderr)
    for run in (first, second)
  }
  assert said[first] and said[second], second.stderr[-2000:]
  # Every program the first run kept is loaded, not compiled, by the second (the first may load one it built
  # twice; a program near the 0.1 s threshold may be kept by one run and not the other, so no exact counts).
  hits = {run: int(said[run].group(3)) for run in (first, second)}
  assert hits[second] >= len(cached) and hits[second] > hits[first], hits
  assert "compiled jit(train_step) in" in first.stderr  # where a slow start went
