"""Outputs are written whole or not at all: each goes to NAME.tmp beside it and is renamed over NAME (os.replace is
atomic on one filesystem), so a stop, a crash or a full disk leaves the old complete file or none."""

from __future__ import annotations

import os
from pathlib import Path


def temporary(path: str | os.PathLike) -> Path:
  """Where `path` is written before it is renamed into place."""
  path = Path(path)
  return path.with_name(path.name + ".tmp")


def replace_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (UTF-8)."""
  tmp = temporary(path)
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
