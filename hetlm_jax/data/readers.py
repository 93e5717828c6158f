"""Readers that turn event files of several formats into one normalised Arrow table.

Normalised columns: `user_id` (string), `timestamp` (int64 seconds), `page` (string), and
optionally `session_id` (int64 codes) and `event_type` (string, nulls allowed). The table's
schema metadata records the source path, the resolved format and the input's user-id type
(`hetlm_source`, `hetlm_format`, `hetlm_user_id`: int64 or string).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from hetlm_jax import interrupt
from hetlm_jax.data.ownership import owned_rows, user_hash
from hetlm_jax.data.sources import Part, Source, resolve
from hetlm_jax.errors import HetlmError, input_error, one_line

FORMATS = ("auto", "events", "msnbc", "user_items")
REQUIRED_COLUMNS = ("user_id", "timestamp", "page")
OPTIONAL_COLUMNS = ("session_id", "event_type")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv", ".csv.gz")
_SNIFF_LINES = 20
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as spreadsheet programs write it
# 2200-01-01 in seconds since 1970: later times are another unit (milliseconds now are ~1.7e12) or junk.
_LATEST_S = 7_258_118_400
# Errors that pyarrow, numpy and the stdlib decoders raise on malformed input.
_READ_ERRORS = (
  pa.ArrowException,
  OSError,
  ValueError,
  TypeError,
  EOFError,
  IndexError,
  zipfile.BadZipFile,
  UnicodeDecodeError,
)


def read_events(
  path: str | os.PathLike,
  fmt: str = "auto",
  max_users: int | None = None,
  share: tuple[int, int] = (0, 1),
  parts_by_user: bool = False,
) -> pa.Table:
  """Reads `path` (a file, folder, glob, list or URI: see data/sources.py) as `fmt` (see FORMATS) into the
  normalised event table.

  `max_users` keeps only the first N users in order of first appearance in the input. `share` (p, P): only the
  events of the users process p of P owns (data/ownership.py), kept part by part, so no more than one part's
  rows of other users are held at a time; with `parts_by_user` (each part holds whole users), the parts p, p+P,
  ... whole, and no other part is opened.
  """
  source = _source(path, fmt)
  if parts_by_user and share[1] > 1:
    if len(source.parts) < share[1]:
      raise input_error(
        source.name,
        f"--parts_by_user: {len(source.parts)} part file(s) for {share[1]} processes, each of which reads its "
        "own parts; write at least one part per process, or leave --parts_by_user out",
      )
    source = dataclasses.replace(source, parts=source.parts[share[0] :: share[1]])
    share = (0, 1)
  try:
    fmt, table, int_ids = _read(source, fmt, share)
    if max_users is not None:
      table = _first_users(table, max_users, source.name)
  except HetlmError:
    raise
  except _READ_ERRORS as e:
    raise input_error(source.name, f"cannot read: {one_line(e)}") from None
  meta = {
    b"hetlm_source": source.name.encode(),
    b"hetlm_format": fmt.encode(),
    b"hetlm_user_id": b"int64" if int_ids else b"string",
  }
  return table.replace_schema_metadata(meta)


def _source(path: str | os.PathLike, fmt: str) -> Source:
  """The files of `path`, once `fmt` is a known format that can read them."""
  name = os.fspath(path)
  if fmt not in FORMATS:
    raise input_error(name, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  source = resolve(name)
  if fmt in ("msnbc", "user_items") and not source.is_one_file:
    raise input_error(name, f"--format={fmt} reads one file; part files must be Parquet or CSV events")
  return source


def detect_format(path: str | os.PathLike) -> str:
  """The format `read_events(path, "auto")` would use: "events", "msnbc" or "user_items"."""
  source = resolve(path)
  part = source.parts[0]
  if not source.is_one_file or _has_suffix(part.name, _PARQUET_SUFFIXES + _CSV_SUFFIXES):
    return "events"
  try:
    return _sniff(part.name, _load_bytes(part))
  except HetlmError:
    raise
  except _READ_ERRORS as e:
    raise input_error(part.name, f"cannot read: {one_line(e)}") from None


def check_columns(schema: pa.Schema, source: str = "events") -> None:
  """Refuses a schema without the required event columns, naming them."""
  missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
  if missing:
    raise input_error(
      source, f"missing required column(s) {', '.join(missing)} (has: {', '.join(schema.names) or 'none'})"
    )


def normalise_events(table: pa.Table, source: str = "events") -> pa.Table:
  """Checks columns and converts them to the normalised types; `source` names the input in errors."""
  check_columns(table.schema, source)
  if table.num_rows == 0:
    raise input_error(source, "no events (empty table)")
  cols = {
    "user_id": _to_string(table["user_id"], "user_id", source, allow_int=True),
    "timestamp": _to_seconds(table["timestamp"], source),
    "page": _to_string(table["page"], "page", source, allow_int=True),
  }
  _check_seconds(cols["timestamp"], source)
  for name in ("user_id", "page"):
    _no_nulls(cols[name], name, source)
  if "session_id" in table.column_names:
    cols["session_id"] = _session_codes(table["session_id"], source)
  if "event_type" in table.column_names:
    cols["event_type"] = _to_string(table["event_type"], "event_type", source, allow_int=False)
  return pa.table(cols)


# ---------------------------------------------------------------------------------------------
# Format dispatch


def _read(source: Source, fmt: str, share: tuple[int, int]) -> tuple[str, pa.Table, bool]:
  """(the format read, the normalised table of the users of `share`, whether user ids are integers)."""
  part = source.parts[0]
  if fmt == "events" or not source.is_one_file or _has_suffix(part.name, _PARQUET_SUFFIXES + _CSV_SUFFIXES):
    return ("events", *_read_parts(source, share))
  data = _load_bytes(part)
  if fmt == "auto":
    fmt = _sniff(part.name, data)
    if fmt == "events":
      return ("events", *_read_parts(source, share))
  table = _parse_msnbc(data, part.name) if fmt == "msnbc" else _parse_user_items(data, part.name)
  return fmt, owned_rows(normalise_events(table, part.name), *share), fmt == "msnbc"


def _read_parts(source: Source, share: tuple[int, int]) -> tuple[pa.Table, bool]:
  """Every part read whole, normalised on its own and cut to the users of `share`, then concatenated; parts must
  agree on their columns' kinds."""
  kinds, tables = _Kinds(), []
  for part in source.parts:
    raw = _with_partition(_read_events_file(part), part)
    kinds.check(raw.schema, part.name)
    tables.append(owned_rows(normalise_events(raw, part.name), *share))
    interrupt.safe_point("while reading the data", "nothing was written")
  return pa.concat_tables(tables), kinds.int_ids


class _Kinds:
  """The kind (string, integer, or the Arrow type) of each event column in the first part that has it; a later
  part with another kind clashes (an int64 user_id in one part, a string one in the next)."""

  def __init__(self):
    self.first: dict[str, tuple[str, str]] = {}

  def check(self, schema: pa.Schema, name: str) -> None:
    """Remembers the column kinds of the part `name`, or refuses the first that clashes with an earlier part's."""
    for column in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
      if column not in schema.names:
        continue
      t = schema.field(column).type
      t = t.value_type if pa.types.is_dictionary(t) else t
      if pa.types.is_null(t):
        continue  # an all-null column (a small part) says nothing of its type
      kind = "string" if _is_stringlike(t) else "integer" if pa.types.is_integer(t) else str(t)
      seen = self.first.setdefault(column, (kind, name))
      if seen[0] != kind:
        raise input_error(
          name, f"column '{column}' is {kind} here but {seen[0]} in {seen[1]}: the parts' schemas clash"
        )

  @property
  def int_ids(self) -> bool:
    """Whether the parts' user ids are integers."""
    return self.first.get("user_id", ("",))[0] == "integer"


def _with_partition(table: pa.Table, part: Part) -> pa.Table:
  """An event column the part file lacks but a hive folder above it names (user_id=42/part-0.parquet)."""
  for key, value in part.partition:
    if key in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and key not in table.column_names:
      table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
  return table


def _is_parquet(part: Part) -> bool:
  if _has_suffix(part.name, _PARQUET_SUFFIXES):
    return True
  return not _has_suffix(part.name, _CSV_SUFFIXES) and part.head(4) == b"PAR1"


def _read_events_file(part: Part) -> pa.Table:
  return _read_parquet(part) if _is_parquet(part) else _read_csv(part)


def _parquet_columns(schema: pa.Schema) -> list[str]:
  """The event columns a Parquet file has."""
  return [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in schema.names]


def _read_parquet(part: Part) -> pa.Table:
  try:
    with part.open() as f:
      file = pq.ParquetFile(f)
      return file.read(columns=_parquet_columns(file.schema_arrow))  # normalise_events names what is missing
  except _READ_ERRORS as e:
    raise input_error(part.name, f"not a readable Parquet file ({one_line(e)})") from None


# Ids and pages stay strings ("007" is not 7); only "" means null so a page named "NA" survives; a quoted value
# may hold a newline (RFC 4180), e.g. a page title.
_CSV_CONVERT = pacsv.ConvertOptions(
  column_types={c: pa.string() for c in ("user_id", "page", "event_type", "session_id")},
  strings_can_be_null=True,
  null_values=[""],
)
_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def _refuse_html(name: str, head: bytes) -> None:
  """An HTML page saved in place of a CSV download is named as such, not parsed."""
  if head.removeprefix(_BOM).lstrip().lower().startswith((b"<!doctype html", b"<html")):
    raise input_error(name, "is an HTML page, not CSV (a web page saved in place of the download?)")


def _read_csv(part: Part) -> pa.Table:
  try:
    with part.stream() as f:
      _refuse_html(part.name, f.read(512))
    with part.stream() as f:
      return pacsv.read_csv(f, convert_options=_CSV_CONVERT, parse_options=_CSV_PARSE)
  except HetlmError:
    raise
  except _READ_ERRORS as e:
    raise input_error(part.name, f"not a readable CSV file ({one_line(e)})") from None


def _load_bytes(part: Part) -> bytes:
  """The file's bytes, decompressed when it is a .gz or a .zip."""
  data = part.read()
  try:
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
    elif data[:4] == b"PK\x03\x04":
      data = _zip_member(data, part.name)
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise input_error(part.name, f"corrupt compressed file ({one_line(e)})") from None
  return data.removeprefix(_BOM)


def _zip_member(data: bytes, path: str) -> bytes:
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    # The UCI zip carries macOS resource forks next to the real file.
    names = [
      n
      for n in zf.namelist()
      if not n.endswith("/") and not n.startswith("__MACOSX/") and not os.path.basename(n).startswith("._")
    ]
    seq = [n for n in names if n.endswith(".seq")]
    pick = seq if len(seq) == 1 else names
    if len(pick) != 1:
      raise input_error(path, f"zip archive must hold exactly one data file, found {len(names)}")
    return zf.read(pick[0])


def _sniff(path: str, data: bytes) -> str:
  if data[:4] == b"PAR1":
    return "events"
  head = data[: 1 << 16]
  if head.lstrip().startswith(b"%"):
    return "msnbc"
  lines = head.splitlines()
  if len(data) > len(head):
    lines = lines[:-1]  # may be cut mid-line
  lines = [ln for ln in lines if ln.strip()][:_SNIFF_LINES]
  if lines and all(len(ln.split()) == 2 for ln in lines):
    return "user_items"
  raise input_error(path, "cannot tell the format; pass --format")


# ---------------------------------------------------------------------------------------------
# Text formats


def _parse_msnbc(data: bytes, path: str) -> pa.Table:
  """UCI MSNBC: '%' header, a line of category names, '% Sequences:', one line of ids per user.

  Blank lines directly after '% Sequences:' belong to the header; later blank lines are users
  without events: they keep their index (user ids are line indices) but yield no rows.
  """
  marker = re.search(rb"^[ \t]*%[ \t]*Sequences:?[^\n]*(\n|$)", data, re.M | re.I)
  if marker is None:
    raise input_error(path, "not an MSNBC file: no '% Sequences:' line")
  header = [ln.strip() for ln in data[: marker.start()].splitlines()]
  names_lines = [ln for ln in header if ln and not ln.startswith(b"%")]
  if not names_lines:
    raise input_error(path, "MSNBC header has no line of category names")
  names = _decode(names_lines[-1], path).split()
  body = data[marker.end() :]
  stripped = body.lstrip(b" \t\r\n")
  first_line = data[: marker.end()].count(b"\n") + body[: len(body) - len(stripped)].count(b"\n") + 1
  ids_E, line_E = _parse_int_lines(stripped, path, first_line)
  out_of_range = (ids_E < 1) | (ids_E > len(names))
  if out_of_range.any():
    bad = int(line_E[np.flatnonzero(out_of_range)[0]])
    raise input_error(path, f"line {first_line + bad}: category id out of range 1..{len(names)}")
  if len(ids_E) == 0:
    raise input_error(path, "no events (no sequence lines)")
  counts_L = np.bincount(line_E)
  return pa.table(
    {
      "user_id": pc.cast(pa.array(line_E), pa.string()),
      "timestamp": pa.array(_position_in_group(counts_L)),
      "page": pa.array(names, pa.string()).take(pa.array(ids_E - 1)),
      "session_id": pa.array(line_E),
    }
  )


def _parse_int_lines(body: bytes, path: str, first_line: int) -> tuple[np.ndarray, np.ndarray]:
  """Every whitespace-separated non-negative integer in `body`, and the 0-based line it is on."""
  b = np.frombuffer(body, np.uint8)
  newline = b == ord("\n")
  digit = (b >= ord("0")) & (b <= ord("9"))
  space = newline | (b == ord(" ")) | (b == ord("\t")) | (b == ord("\r"))
  if not (digit | space).all():
    bad = int(np.flatnonzero(~(digit | space))[0])
    raise input_error(
      path, f"line {first_line + int(newline[:bad].sum())}: expected category ids, found {bytes(b[bad : bad + 1])!r}"
    )
  edge = np.diff(digit.view(np.int8), prepend=np.int8(0), append=np.int8(0))
  start_E = np.flatnonzero(edge == 1)
  end_E = np.flatnonzero(edge == -1) - 1  # last digit of each token
  width_E = end_E - start_E + 1
  max_width = int(width_E.max()) if len(width_E) else 0
  if max_width > 18:
    raise input_error(path, f"category id with {max_width} digits is too large")
  value_E = np.zeros(len(start_E), np.int64)
  for place in range(max_width):  # a handful of digit places, not one pass per token
    digit_E = b[np.maximum(end_E - place, 0)].astype(np.int64) - ord("0")
    value_E += np.where(width_E > place, digit_E, 0) * 10**place
  # int32 cumsum is several times faster than numpy's default int64 one for booleans.
  count_dtype = np.int32 if len(b) < 2**31 else np.int64
  line_E = np.cumsum(newline, dtype=count_dtype)[start_E]
  return value_E, line_E.astype(np.int64)


def _parse_user_items(data: bytes, path: str) -> pa.Table:
  """SASRec-style 'user item' lines in time order; the row index is the timestamp."""
  lines = _lines(data, path)
  counts_L, tokens = _split_lines(lines)
  bad = (counts_L != 2) & (counts_L != 0)
  if bad.any():
    line = int(np.flatnonzero(bad)[0])
    raise input_error(path, f"line {line + 1}: expected 2 tokens 'user item', found {counts_L[line]}")
  if len(tokens) == 0:
    raise input_error(path, "no events (empty file)")
  users = tokens.take(pa.array(np.arange(0, len(tokens), 2)))
  codes = pc.dictionary_encode(users).indices
  return pa.table(
    {
      "user_id": users,
      "timestamp": pa.array(np.arange(len(users), dtype=np.int64)),
      "page": tokens.take(pa.array(np.arange(1, len(tokens), 2))),
      "session_id": pc.cast(codes, pa.int64()),
    }
  )


def _lines(data: bytes, path: str) -> pa.Array:
  text = _decode(data, path)
  return pc.split_pattern(pa.array([text], pa.large_string()), "\n").flatten()


def _split_lines(lines: pa.Array) -> tuple[np.ndarray, pa.Array]:
  """Whitespace-split every line at once: tokens per line and the flat token array."""
  trimmed = pc.ascii_trim_whitespace(lines)
  parts = pc.ascii_split_whitespace(trimmed)
  counts_L = pc.list_value_length(parts).to_numpy().astype(np.int64)
  # An empty line splits into one empty token; after trimming no other line can produce one.
  empty_L = pc.equal(pc.utf8_length(trimmed), 0).to_numpy(zero_copy_only=False)
  counts_L[empty_L] = 0
  tokens = parts.flatten()
  tokens = tokens.filter(pc.not_equal(tokens, ""))
  return counts_L, pc.cast(tokens, pa.string())


def _position_in_group(counts_G: np.ndarray) -> np.ndarray:
  """0, 1, ..., c-1 for each group of size c, concatenated."""
  starts_G = np.cumsum(counts_G) - counts_G
  return np.arange(int(counts_G.sum()), dtype=np.int64) - np.repeat(starts_G, counts_G)


def _decode(data: bytes, path: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise input_error(path, f"not UTF-8 text (bad byte at offset {e.start})") from None


# ---------------------------------------------------------------------------------------------
# Column normalisation


def _is_stringlike(t: pa.DataType) -> bool:
  return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _undictionary(col: pa.ChunkedArray) -> pa.ChunkedArray:
  return col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _to_string(col: pa.ChunkedArray, name: str, source: str, allow_int: bool) -> pa.ChunkedArray:
  col = _undictionary(col)
  t = col.type
  if _is_stringlike(t) or pa.types.is_null(t) or (allow_int and pa.types.is_integer(t)):
    return col.cast(pa.string())
  expected = "string or integer" if allow_int else "string"
  raise input_error(source, f"column '{name}' has type {t}, expected {expected}")


def _no_nulls(col: pa.ChunkedArray, name: str, source: str) -> None:
  if col.null_count:
    raise input_error(source, f"column '{name}' has {col.null_count} null value(s)")


_UNIT_PER_S = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_UNIT_NAMES = {"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def _to_seconds(col: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
  """Integer seconds, from integers, floats, timestamps, dates or numeric/ISO-8601 strings."""
  col = _undictionary(col)
  _no_nulls(col, "timestamp", source)
  t = col.type
  if _is_stringlike(t):
    return _strings_to_seconds(col, source)
  if pa.types.is_integer(t):
    try:
      return col.cast(pa.int64())
    except pa.ArrowInvalid:
      raise input_error(source, "column 'timestamp' has values beyond int64") from None
  if pa.types.is_floating(t) or pa.types.is_decimal(t):
    col = col.cast(pa.float64())
    if pc.any(pc.is_nan(col)).as_py():
      raise input_error(source, "column 'timestamp' has NaN values")
    try:
      return pc.floor(col).cast(pa.int64())
    except pa.ArrowInvalid:
      raise input_error(source, "column 'timestamp' has values beyond int64") from None
  if pa.types.is_timestamp(t):
    ticks = col.cast(pa.int64()).to_numpy()
    return pa.chunked_array([ticks // _UNIT_PER_S[t.unit]])
  if pa.types.is_date32(t):
    return pa.chunked_array([col.cast(pa.int32()).to_numpy().astype(np.int64) * 86_400])
  if pa.types.is_date64(t):
    return pa.chunked_array([col.cast(pa.int64()).to_numpy() // 1_000])
  raise input_error(source, f"column 'timestamp' has type {t}, expected integer seconds, float seconds or a timestamp")


def _strings_to_seconds(col: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
  # Nanoseconds end in 2262: later dates parse as microseconds, to be refused as dates rather than as text.
  for target in (
    pa.int64(),
    pa.float64(),
    pa.timestamp("ns"),
    pa.timestamp("ns", tz="UTC"),
    pa.timestamp("us"),
    pa.timestamp("us", tz="UTC"),
  ):
    try:
      return _to_seconds(col.cast(target), source)
    except pa.ArrowInvalid:
      continue
  numeric = pc.match_substring_regex(col, r"^\s*[-+]?[0-9]+(\.[0-9]*)?\s*$")
  odd = col.filter(pc.invert(numeric))
  example = (odd if len(odd) else col)[0].as_py()
  raise input_error(
    source,
    f"column 'timestamp' holds non-numeric strings such as {example!r}; "
    "expected integer seconds or ISO-8601 timestamps",
  )


def _check_seconds(col: pa.ChunkedArray, source: str) -> None:
  """Refuses times before 1970 (often -1 for unknown) or after 2200 (often milliseconds, not seconds)."""
  lo, hi = (x.as_py() for x in pc.min_max(col).values())
  if lo < 0:
    raise input_error(source, f"column 'timestamp' has negative values such as {lo}; expected seconds since 1970")
  if hi > _LATEST_S:
    # A unit guessed only if it puts the latest time between 1990 and 2200.
    unit = next((name for name, per_s in _UNIT_PER_S.items() if 631_152_000 <= hi // per_s <= _LATEST_S), None)
    guess = f" (these look like {_UNIT_NAMES[unit]})" if unit else ""
    raise input_error(
      source, f"column 'timestamp' has values after the year 2200 such as {hi}{guess}; expected seconds since 1970"
    )


def _session_codes(col: pa.ChunkedArray, source: str) -> pa.ChunkedArray:
  """int64 codes that depend only on each id, never on the other rows read with it: an integer id is its own code,
  a string id its 64-bit FNV-1a hash (data/ownership.py). A log read in parts or pieces (part files, row groups,
  `hetlm predict`'s chunks) thus gives one session the same code in every piece; codes ranked within each piece
  gave a user's one session a different code in each and split it."""
  col = _undictionary(col)
  t = col.type
  if not (_is_stringlike(t) or pa.types.is_integer(t)):
    raise input_error(source, f"column 'session_id' has type {t}, expected string or integer")
  _no_nulls(col, "session_id", source)
  if pa.types.is_integer(t):
    return pc.cast(col, pa.int64())
  return pa.chunked_array([user_hash(col).view(np.int64)])


def _first_users(table: pa.Table, max_users: int, source: str) -> pa.Table:
  # unique() lists values in order of first appearance.
  first = pc.unique(table["user_id"])[: max(int(max_users), 0)]
  table = table.filter(pc.is_in(table["user_id"], value_set=first))
  if table.num_rows == 0:
    raise input_error(source, f"no users left after max_users={max_users}")
  return table


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
  return path.lower().endswith(suffixes)


# ---------------------------------------------------------------------------------------------
# Streaming


class EventStream:
  """The normalised event table of `path` (a file, folder, glob, list or URI) in pieces of about `batch_rows`
  rows, never a whole file at once (Parquet by row groups, CSV by blocks, part after part); the text formats
  (msnbc, user_items) are parsed whole first, then cut. `total_rows`: the input's rows when known without
  reading it (Parquet metadata, text formats), else None; `int_ids`: the input's user ids are integers
  (read_events' hetlm_user_id)."""

  def __init__(self, path: str | os.PathLike, fmt: str = "auto", batch_rows: int = 65_536):
    self.source, self.batch_rows = _source(path, fmt), max(int(batch_rows), 1)
    self.path = self.source.name
    self.format = detect_format(self.path) if fmt == "auto" else fmt
    self._whole = None
    try:
      if self.format != "events":
        self._whole = read_events(self.path, self.format)
        self.int_ids = (self._whole.schema.metadata or {}).get(b"hetlm_user_id") == b"int64"
        self.total_rows = self._whole.num_rows
        return
      self._parquet = [_is_parquet(part) for part in self.source.parts]
      kinds, rows = _Kinds(), 0
      for part, parquet in zip(self.source.parts, self._parquet):
        if not parquet:
          with part.stream() as f:
            _refuse_html(part.name, f.read(512))
          rows = None
          continue
        with part.open() as f:
          file = pq.ParquetFile(f)
          schema = _with_partition(file.schema_arrow.empty_table(), part).schema
          check_columns(schema, part.name)
          kinds.check(schema, part.name)
          rows = None if rows is None else rows + file.metadata.num_rows
      self.int_ids, self.total_rows = kinds.int_ids, rows
    except HetlmError:
      raise
    except _READ_ERRORS as e:
      raise input_error(self.path, f"cannot read: {one_line(e)}") from None

  def _raw(self):
    """(part, raw piece) pairs; part None for a text format parsed whole."""
    if self._whole is not None:
      for start in range(0, self._whole.num_rows, self.batch_rows):
        yield None, self._whole.slice(start, self.batch_rows)
      return
    for part, parquet in zip(self.source.parts, self._parquet):
      if parquet:
        with part.open() as f:
          file = pq.ParquetFile(f)
          for batch in file.iter_batches(self.batch_rows, columns=_parquet_columns(file.schema_arrow)):
            yield part, pa.Table.from_batches([batch])
        continue
      read = pacsv.ReadOptions(block_size=max(self.batch_rows * 64, 1 << 16))  # about batch_rows rows of ~64 bytes
      with (
        part.stream() as f,
        pacsv.open_csv(f, read_options=read, parse_options=_CSV_PARSE, convert_options=_CSV_CONVERT) as r,
      ):
        for batch in r:
          yield part, pa.Table.from_batches([batch])

  def __iter__(self):
    """Normalised tables of at least one row each; one error line (HetlmError) on a malformed piece."""
    kinds, name = _Kinds(), self.path
    try:
      for part, table in self._raw():
        if not table.num_rows:
          continue
        if part is None:
          yield table
          continue
        name = part.name
        table = _with_partition(table, part)
        kinds.check(table.schema, name)
        yield normalise_events(table, name)
    except HetlmError:
      raise
    except _READ_ERRORS as e:
      raise input_error(name, f"cannot read: {one_line(e)}") from None

  @property
  def parsed_whole(self) -> bool:
    """A text format, parsed whole when the stream was opened (its pieces are slices of it, not reads)."""
    return self._whole is not None

  def count_rows(self) -> int:
    """The input's rows (CSV parts are read through once to count them)."""
    if self.total_rows is None:
      self.total_rows = sum(t.num_rows for _, t in self._raw())
    return self.total_rows
