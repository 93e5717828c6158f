"""Outputs are written whole or not at all: each goes to NAME.tmp beside it and is renamed over NAME (os.replace is
atomic on one filesystem), so a stop, a crash or a full disk leaves the old complete file or none."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temporary(path: str | os.PathLike, hidden: bool = False) -> Path:
  """Where `path` is written before it is renamed into place (hidden: .NAME.tmp, which readers of a folder of
  Parquet parts skip)."""
  path = Path(path)
  return path.with_name(f".{path.name}.tmp" if hidden else f"{path.name}.tmp")


@contextlib.contextmanager
def written(path: str | os.PathLike, hidden: bool = False) -> Iterator[Path]:
  """Yields the temporary path to write `path` to; it is renamed over `path` when the block ends, and removed
  if the block raises (a stop, an error), leaving the old `path` or none."""
  tmp = temporary(path, hidden)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def replace_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (UTF-8)."""
  with written(path) as tmp:
    tmp.write_text(text, encoding="utf-8")
