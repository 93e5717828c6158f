"""read_events: each format, auto-detection, normalised types and one-line errors for bad input."""

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetlm_jax.data import SAMPLE_PATH, PageTokenizer, build_sequences, outcome_types
from hetlm_jax.data.ownership import user_hash
from hetlm_jax.data.readers import EventStream, detect_format, read_events
from hetlm_jax.errors import HetlmError

OTTO = Path(__file__).parent / "data" / "otto_sample.parquet"
MSNBC = (
  b"% Different categories found in input file:\r\n\r\n"
  b"frontpage news tech\r\n\r\n\r\n% Sequences:\r\n\r\n"
  b"1 1 \r\n2 \r\n3 2 2 \r\n\r\n1 3 "
)


def columns(table):
  return {name: table[name].to_pylist() for name in table.column_names}


def write_parquet(path, **cols):
  pq.write_table(pa.table(cols), path)
  return str(path)


def test_parquet_normalises_types_and_ignores_extra_columns(tmp_path):
  ts = pa.array([1_500, 2_999, 61_000], pa.timestamp("ms"))
  path = write_parquet(
    tmp_path / "e.parquet",
    user_id=[7, 7, 8],
    timestamp=ts,
    page=["a", "b", "a"],
    session_id=["x", "y", "x"],
    extra=[1.0, 2.0, 3.0],
  )
  table = read_events(path)
  assert table.column_names == ["user_id", "timestamp", "page", "session_id"]
  assert table.schema.field("timestamp").type == pa.int64()
  assert table.schema.field("session_id").type == pa.int64()
  assert columns(table) == {
    "user_id": ["7", "7", "8"],
    "timestamp": [1, 2, 61],
    "page": ["a", "b", "a"],
    "session_id": user_hash(pa.array(["x", "y", "x"])).view(np.int64).tolist(),  # string ids: their hash
  }
  assert table.schema.metadata[b"hetlm_format"] == b"events"


def test_a_session_has_one_code_in_every_part_and_piece_it_is_read_in(tmp_path):
  """Codes ranked within each part gave a user's session spread over two parts two codes (two sessions)."""
  table = pa.table(
    {
      "user_id": ["u", "v", "u", "v", "u"],
      "timestamp": [1, 2, 3, 4, 5],
      "page": ["a", "b", "c", "d", "e"],
      "session_id": ["s2", "s1", "s2", "s9", "s3"],
    }
  )
  (tmp_path / "parts").mkdir()
  pq.write_table(table.slice(0, 2), tmp_path / "parts" / "0.parquet")  # s2 and s1
  pq.write_table(table.slice(2), tmp_path / "parts" / "1.parquet")  # s2 again, s9, s3
  pq.write_table(table, tmp_path / "one.parquet")
  whole, parts = read_events(tmp_path / "one.parquet"), read_events(tmp_path / "parts")
  assert whole["session_id"].to_pylist() == parts["session_id"].to_pylist()
  codes = parts["session_id"].to_pylist()
  assert codes[0] == codes[2] and len(set(codes)) == 4
  streamed = [t["session_id"].to_pylist() for t in EventStream(tmp_path / "parts", batch_rows=1)]
  assert sum(streamed, []) == codes
  ints = read_events(
    write_parquet(
      tmp_path / "i.parquet", user_id=["u"] * 3, timestamp=[1, 2, 3], page=list("abc"), session_id=[40, 7, 40]
    )
  )
  assert ints["session_id"].to_pylist() == [40, 7, 40]  # integer ids are their own codes


def test_float_integer_and_iso_timestamps(tmp_path):
  path = write_parquet(tmp_path / "f.pq", user_id=["u", "u"], timestamp=[1.9, 2.0], page=["a", "b"])
  assert read_events(path)["timestamp"].to_pylist() == [1, 2]
  path = write_parquet(tmp_path / "s.pq", user_id=["u"], timestamp=["1970-01-01T00:01:00"], page=["a"])
  assert read_events(path)["timestamp"].to_pylist() == [60]


def test_csv_and_csv_gz(tmp_path):
  text = "user_id,timestamp,page,event_type,other\n007,10,home,view,x\n007,20,NA,cart,y\n8,5,home,,z\n"
  (tmp_path / "e.csv").write_text(text)
  with gzip.open(tmp_path / "e.csv.gz", "wt") as f:
    f.write(text)
  for name in ("e.csv", "e.csv.gz"):
    table = read_events(tmp_path / name)
    assert columns(table) == {
      "user_id": ["007", "007", "8"],
      "timestamp": [10, 20, 5],
      "page": ["home", "NA", "home"],
      "event_type": ["view", "cart", None],
    }


def test_otto_fixture_reads_with_outcomes():
  table = read_events(OTTO)
  assert table.num_rows == 862 and set(table["event_type"].to_pylist()) == {"clicks", "carts", "orders"}
  assert outcome_types(table) == ["carts", "orders"]
  seqs, stats = build_sequences(table, PageTokenizer.fit(table["page"], outcome_types(table)))
  assert stats["users"] == 20 and stats["outcome_events"] > 0


def test_msnbc_text_gz_and_zip(tmp_path):
  (tmp_path / "m.seq").write_bytes(MSNBC)
  (tmp_path / "m.seq.gz").write_bytes(gzip.compress(MSNBC))
  with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
    zf.writestr("msnbc990928.seq", MSNBC)
    zf.writestr("__MACOSX/._msnbc990928.seq", b"resource fork")
  expected = {
    "user_id": ["0", "0", "1", "2", "2", "2", "4", "4"],  # line 3 is a user with no events
    "timestamp": [0, 1, 0, 0, 1, 2, 0, 1],
    "page": ["frontpage", "frontpage", "news", "tech", "news", "news", "frontpage", "tech"],
    "session_id": [0, 0, 1, 2, 2, 2, 4, 4],  # the line: an integer session id is its own code
  }
  for name in ("m.seq", "m.seq.gz", "m.zip"):
    assert detect_format(tmp_path / name) == "msnbc"
    for fmt in ("auto", "msnbc"):
      table = read_events(tmp_path / name, fmt=fmt)
      assert columns(table) == expected, name


def test_msnbc_bad_category_id(tmp_path):
  path = tmp_path / "m.txt"
  path.write_bytes(MSNBC.replace(b"3 2 2", b"3 9 2"))
  with pytest.raises(HetlmError, match=r"line 10: category id out of range 1\.\.3"):
    read_events(path)
  path.write_bytes(MSNBC.replace(b"3 2 2", b"3 x 2"))
  with pytest.raises(HetlmError, match=r"line 10"):
    read_events(path)


def test_user_items_and_auto_detection(tmp_path):
  path = tmp_path / "items.txt"
  path.write_text("1 10\n1 11\n\n2 10\n1 12\n")
  assert detect_format(path) == "user_items"
  table = read_events(path)
  assert columns(table)["user_id"] == ["1", "1", "2", "1"]
  assert columns(table)["page"] == ["10", "11", "10", "12"]
  assert columns(table)["timestamp"] == [0, 1, 2, 3]
  assert table.schema.metadata[b"hetlm_format"] == b"user_items"
  seqs, stats = build_sequences(table, PageTokenizer.fit(table["page"]))
  assert stats["holdout"] == "last" and stats["users_dropped_too_short"] == 1
  assert seqs.n_sessions.tolist() == [1]


def test_undetectable_format(tmp_path):
  path = tmp_path / "what.txt"
  path.write_text("a b c\nd e f\n")
  with pytest.raises(HetlmError, match="cannot tell the format; pass --format"):
    read_events(path)


def test_max_users_keeps_first_users_in_file_order(tmp_path):
  path = write_parquet(
    tmp_path / "e.parquet", user_id=["z", "a", "z", "m", "a"], timestamp=[1, 2, 3, 4, 5], page=list("pqrst")
  )
  assert read_events(path, max_users=2)["user_id"].to_pylist() == ["z", "a", "z", "a"]
  with pytest.raises(HetlmError, match="no users left"):
    read_events(path, max_users=0)


def test_packaged_sample_has_20000_users():
  table = read_events(SAMPLE_PATH)
  assert table.schema.metadata[b"hetlm_format"] == b"msnbc"
  user = table["user_id"].to_numpy(zero_copy_only=False)
  assert len(np.unique(user)) == 20000 and user[-1] == "19999"
  assert set(table["page"].to_pylist()) <= {
    "frontpage",
    "news",
    "tech",
    "local",
    "opinion",
    "on-air",
    "misc",
    "weather",
    "msn-news",
    "health",
    "living",
    "business",
    "msn-sports",
    "sports",
    "summary",
    "bbs",
    "travel",
  }


def bad_inputs(tmp_path):
  """(path, message fragment) for each kind of bad input."""
  good = write_parquet(
    tmp_path / "good.parquet", user_id=["u"] * 50, timestamp=list(range(50)), page=[f"p{i}" for i in range(50)]
  )
  data = Path(good).read_bytes()
  (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
  (tmp_path / "garbage.parquet").write_bytes(bytes(range(256)) * 4)
  (tmp_path / "garbage.csv.gz").write_bytes(b"\x1f\x8b not really gzip")
  (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x01 x\n")
  (tmp_path / "missing_ts.csv").write_text("user_id,page\nu,a\n")
  (tmp_path / "empty.csv").write_text("user_id,timestamp,page\n")
  (tmp_path / "words.csv").write_text("user_id,timestamp,page\nu,noon,a\nu,later,b\n")
  write_parquet(tmp_path / "null_user.parquet", user_id=["u", None], timestamp=[1, 2], page=["a", "b"])
  write_parquet(tmp_path / "list_page.parquet", user_id=["u"], timestamp=[1], page=[["a", "b"]])
  write_parquet(tmp_path / "words.parquet", user_id=["u"], timestamp=["soon"], page=["a"])
  pq.write_table(
    pa.table(
      {"user_id": pa.array([], pa.string()), "timestamp": pa.array([], pa.int64()), "page": pa.array([], pa.string())}
    ),
    tmp_path / "empty.parquet",
  )
  return [
    (tmp_path / "nope.parquet", "no such file"),
    (tmp_path / "truncated.parquet", "not a readable Parquet file"),
    (tmp_path / "garbage.parquet", "not a readable Parquet file"),
    (tmp_path / "garbage.csv.gz", "CSV"),
    (tmp_path / "binary.txt", "UTF-8"),
    (tmp_path / "missing_ts.csv", "missing required column(s) timestamp"),
    (tmp_path / "empty.csv", "empty"),
    (tmp_path / "empty.parquet", "empty"),
    (tmp_path / "words.csv", "non-numeric strings such as 'noon'"),
    (tmp_path / "words.parquet", "non-numeric strings such as 'soon'"),
    (tmp_path / "null_user.parquet", "column 'user_id' has 1 null value"),
    (tmp_path / "list_page.parquet", "column 'page' has type list<element: string>"),
  ]


def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path):
  for path, fragment in bad_inputs(tmp_path):
    with pytest.raises(HetlmError) as info:
      read_events(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message
    assert "\n" not in message


def test_bad_format_name(tmp_path):
  with pytest.raises(HetlmError, match="unknown format"):
    read_events(OTTO, fmt="json")
