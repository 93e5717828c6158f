"""Where a log lives: `--data` as a file, a folder of part files (as Spark, BigQuery or DuckDB export them,
hive-partitioned `key=value` folders included), a glob, a comma-separated list of those, or a URI that pyarrow's
filesystems read (gs://, s3://, hdfs://, file://). `resolve` lists the files to read, each with its filesystem,
or says in one line (HetlmError, naming the input) why there is nothing to read.

In a folder, names starting with '.' or '_' are not data (Spark's _SUCCESS and .crc files, _temporary/) and
empty files are skipped; the parts are read in sorted order of their paths, so the result does not depend on
the order a filesystem lists them in.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from hetlm_jax.errors import input_error, one_line

_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class Part:
  """One file of a source: where it is, the name errors give it, its size, and the hive partition values of the
  folders above it (("date", "2024-01-01"), ...)."""

  filesystem: pafs.FileSystem
  path: str
  name: str
  size: int
  partition: tuple[tuple[str, str], ...] = ()

  def open(self) -> pa.NativeFile:
    """The file, for random access (Parquet reads its footer first)."""
    return self.filesystem.open_input_file(self.path)

  def stream(self) -> pa.NativeFile:
    """The file as a stream, decompressed when its name says gzip, bz2, lz4 or zstd."""
    return self.filesystem.open_input_stream(self.path, compression="detect")

  def head(self, n: int) -> bytes:
    """The first `n` bytes as stored (not decompressed)."""
    with self.filesystem.open_input_stream(self.path, compression=None) as f:
      return f.read(n)

  def read(self) -> bytes:
    """The whole file as stored."""
    with self.filesystem.open_input_stream(self.path, compression=None) as f:
      return f.read()


@dataclasses.dataclass(frozen=True)
class Source:
  """`--data` resolved: the name the user gave and its parts, in a fixed order."""

  name: str
  parts: tuple[Part, ...]

  @property
  def is_one_file(self) -> bool:
    """A single file was named (not a folder, glob or list, even of one file)."""
    return len(self.parts) == 1 and self.parts[0].name == self.name


def resolve(data: str | os.PathLike) -> Source:
  """The files of `data` (see the module docstring)."""
  name = os.fspath(data)
  if not name.strip():
    raise input_error("--data", "empty path")
  items = [name] if "," not in name or _is_local_file(name) else [s.strip() for s in name.split(",") if s.strip()]
  parts, seen = [], set()
  for item in items:
    for part in _parts(item):
      if (id(type(part.filesystem)), part.path) not in seen:
        seen.add((id(type(part.filesystem)), part.path))
        parts.append(part)
  return Source(name, tuple(parts))


def _is_local_file(name: str) -> bool:
  return "://" not in name and os.path.isfile(name)


def _filesystem(item: str) -> tuple[pafs.FileSystem, str]:
  if "://" not in item:
    return pafs.LocalFileSystem(), os.path.abspath(item)
  shown = item.split("?", 1)[0]
  try:
    return pafs.FileSystem.from_uri(item)
  except (pa.ArrowException, OSError, ValueError) as e:
    raise input_error(shown, f"cannot open this URI ({one_line(e)})") from None


def _parts(item: str) -> list[Part]:
  """The files `item` (one file, folder, glob or URI of these) names."""
  fs, path = _filesystem(item)
  shown = item.split("?", 1)[0]  # a URI's query (endpoint, region) is not part of its name
  prefix = shown[: len(shown) - len(path.lstrip("/"))] if "://" in shown else ""
  glob_at = min((path.find(c) for c in _GLOB_CHARS if c in path), default=-1)
  if glob_at >= 0:
    base = path[:glob_at].rsplit("/", 1)[0] or "/"
    files = [f for f in _listing(fs, base, shown) if fnmatch.fnmatchcase(f.path, path)]
    if not any(f.size for f in files):
      raise input_error(shown, "matches no file" if not files else f"matches {len(files)} empty file(s) only")
    return [_part(fs, f, base, prefix) for f in sorted(files, key=lambda f: f.path) if f.size]
  info = _info(fs, path, shown)
  if info.type == pafs.FileType.NotFound:
    raise input_error(shown, "no such file or folder")
  if info.type == pafs.FileType.File:
    if not info.size:
      raise input_error(shown, "empty file (0 bytes)")
    return [Part(fs, path, shown, info.size)]
  files = [f for f in _listing(fs, path, shown) if f.size]
  if not files:
    raise input_error(shown, "a folder without data files (none that is non-empty and not named '.*' or '_*')")
  return [_part(fs, f, path, prefix) for f in sorted(files, key=lambda f: f.path)]


def _info(fs: pafs.FileSystem, path: str, shown: str) -> pafs.FileInfo:
  try:
    return fs.get_file_info(path)
  except (pa.ArrowException, OSError) as e:
    raise input_error(shown, f"cannot reach it ({one_line(e)})") from None


def _listing(fs: pafs.FileSystem, base: str, shown: str) -> list[pafs.FileInfo]:
  """Every data file below `base`: no hidden ('.', '_') file or folder on the way."""
  try:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
  except (pa.ArrowException, OSError) as e:
    raise input_error(shown, f"cannot list it ({one_line(e)})") from None
  files = []
  for info in infos:
    below = posixpath.relpath(info.path, base) if base != "/" else info.path.lstrip("/")
    if info.type == pafs.FileType.File and not any(c.startswith((".", "_")) for c in below.split("/")):
      files.append(info)
  return files


def _part(fs: pafs.FileSystem, info: pafs.FileInfo, base: str, prefix: str) -> Part:
  below = posixpath.relpath(info.path, base) if base != "/" else info.path.lstrip("/")
  partition = tuple(tuple(c.split("=", 1)) for c in below.split("/")[:-1] if "=" in c)
  name = prefix + info.path.lstrip("/") if prefix else info.path
  return Part(fs, info.path, name, info.size, partition)
