"""Every file a run writes or reads goes through here, on a local path or a URI of an object store (gs://, s3://,
through etils.epath and fsspec: gcsfs and s3fs, the `cloud` extra), with the same code.

Outputs are written whole or not at all. Locally, each goes to NAME.tmp beside it and is renamed over NAME
(os.replace is atomic on one filesystem), so a stop, a crash or a full disk leaves the old complete file or none. An
object store has no rename: the output is written to a local temporary file and uploaded in one request (one PUT,
or a multipart upload completed at once), and an object appears whole or not at all.

An S3-compatible store other than AWS (MinIO, a test server) is named the way the AWS SDKs read it, in the
environment: AWS_ENDPOINT_URL (and AWS_REGION, the credentials); s3fs, pyarrow, TensorStore (the checkpoints'
arrays, train/checkpoint.py) and tensorboardX all take it from there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Union

from hetlm_jax.errors import HetlmError, one_line

if TYPE_CHECKING:
  import pyarrow as pa
  from etils import epath

# A local folder or file, or one on an object store (etils and pyarrow load when a path needs them: config.py, which
# every command imports first, imports this module).
Location = Union[Path, "epath.Path"]
_NEEDS = {"s3": ("s3fs", "s3fs"), "gs": ("gcsfs", "gcsfs")}  # protocol: (module, package)


def is_uri(path: str | os.PathLike) -> bool:
  """`path` names an object (s3://, gs://), not a local file (file:// is local)."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def location(path: str | os.PathLike, flag: str = "--workdir") -> Location:
  """`path` as a Path, or as an epath.Path when it is a URI (pathlib would make gs://b/run the local folder
  gs:/b/run, so each host of a pod would write its own disk). A protocol whose library is missing is one line."""
  text = os.fspath(path)
  if text.startswith("file://"):
    return Path(text[len("file://") :])
  if not is_uri(text):
    return Path(text)
  protocol = text.split("://", 1)[0]
  if protocol not in _NEEDS:
    raise HetlmError(f"{flag}={text}: {protocol}:// is not a store a run can be written to (gs://, s3://)")
  module, package = _NEEDS[protocol]
  try:
    __import__(module)
  except ImportError:
    raise HetlmError(f"{flag}={text}: a run on {protocol}:// needs {package}: pip install 'hetlm_jax[cloud]'") from None
  _no_listing_cache(protocol)
  from etils import epath

  return epath.Path(text)


def _no_listing_cache(protocol: str) -> None:
  """Another process may have written an object since this one listed its folder: ask the store each time."""
  import fsspec

  fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def temporary(path: str | os.PathLike, hidden: bool = False) -> Path:
  """Where a local `path` is written before it is renamed into place (hidden: .NAME.tmp, which readers of a folder
  of Parquet parts skip)."""
  path = Path(path)
  return path.with_name(f".{path.name}.tmp" if hidden else f"{path.name}.tmp")


@contextlib.contextmanager
def written(path: str | os.PathLike, hidden: bool = False) -> Iterator[Path]:
  """Yields the local temporary path to write `path` to; when the block ends it is renamed over `path` (or, for a
  URI, uploaded to it in one request), and it is removed if the block raises (a stop, an error), leaving the old
  `path` or none."""
  if not is_uri(path):
    tmp = temporary(path, hidden)
    try:
      yield tmp
      os.replace(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)
    return
  folder = Path(tempfile.mkdtemp(prefix="hetlm-upload-"))
  try:
    tmp = folder / Path(os.fspath(path)).name
    yield tmp
    fs, key = filesystem(path)
    fs.put_file(str(tmp), key)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def filesystem(path: str | os.PathLike):
  """(fsspec filesystem, path within it) of a URI."""
  import fsspec

  return fsspec.core.url_to_fs(os.fspath(path))


def replace_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` atomically (UTF-8)."""
  with written(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def read_parquet(path: Location) -> pa.Table:
  """A Parquet file, local or on an object store."""
  import pyarrow.parquet as pq

  if not is_uri(path):
    return pq.read_table(path)
  fs, key = filesystem(path)
  with fs.open(key, "rb") as f:
    return pq.read_table(f)


def remove_tree(path: Location) -> None:
  """Removes a folder (a prefix of objects) and everything in it, if it is there."""
  if is_uri(path):
    fs, key = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
      fs.rm(key, recursive=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def modified(path: Location) -> float:
  """When `path` was last written (seconds since the epoch)."""
  if not is_uri(path):
    return Path(path).stat().st_mtime_ns / 1e9
  fs, key = filesystem(path)
  return fs.modified(key).timestamp()


def check_bucket(path: str | os.PathLike, flag: str = "--workdir") -> None:
  """Refuses a URI whose store cannot be reached or whose bucket is not there, in one line."""
  fs, key = filesystem(path)
  bucket = key.split("/", 1)[0]
  try:
    there = fs.exists(bucket)
  except Exception as e:
    raise HetlmError(f"{flag}={os.fspath(path)}: cannot reach it ({one_line(e)})") from None
  if not there:
    raise HetlmError(f"{flag}={os.fspath(path)}: no bucket {bucket!r} there (or no right to see it)")


def make_dir(path: Location) -> None:
  """Makes a local folder (and its parents); an object store has no folders to make."""
  if not is_uri(path):
    Path(path).mkdir(parents=True, exist_ok=True)


def inside(path: Location, folder: Location) -> bool:
  """`path` is `folder` or lies below it."""
  if is_uri(path) or is_uri(folder):
    below, above = os.fspath(path).rstrip("/"), os.fspath(folder).rstrip("/")
    return below == above or below.startswith(above + "/")
  return Path(path).resolve().is_relative_to(Path(folder).resolve())
