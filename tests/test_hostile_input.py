"""A hostile-input corpus, through the command line: every bad input is refused before anything is written,
with exactly one stderr line `hetlm: error: ...` naming the file and the problem, exit status 2, no traceback,
and a workdir that existed left byte-for-byte unchanged.

Odd inputs a user would expect to work are accepted, each for the reason its test gives: a UTF-8 byte-order
mark, duplicate rows, user ids that mix numbers and text in a CSV, page names with control characters or of
10,000 characters, and one user's session of 100,000 page views.
"""

import gzip
import hashlib
import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events
from test_cli import TINY, run

from hetlm_jax.data.readers import read_events
from hetlm_jax.data.sequences import all_windows, build_sequences
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.main import cli

GOOD = markov_events(n_users=20, n_groups=2, sessions=2, session_len=4)[0]  # 20 users, 8 events each
FAST = ["--init=random", "--nobaselines"]  # the fixture's one training run: seconds, not a minute


def parquet_bytes(table: pa.Table) -> bytes:
  buf = io.BytesIO()
  pq.write_table(table, buf)
  return buf.getvalue()


def csv_bytes(table: pa.Table) -> bytes:
  buf = io.BytesIO()
  pacsv.write_csv(table, buf)
  return buf.getvalue()


def with_column(name: str, values, table: pa.Table = GOOD) -> pa.Table:
  column = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
  return table.set_column(table.schema.get_field_index(name), name, column)


def seconds(table: pa.Table = GOOD) -> np.ndarray:
  return table["timestamp"].to_numpy()


HTML = (
  b"<!DOCTYPE html>\n<html><head><title>Export</title></head>\n<body><p>Your download, will start</p></body></html>\n"
)
YEAR_3000 = 32_503_680_000  # 3000-01-01 in seconds since 1970

# name -> (the file's bytes, or None for a directory; fragments the error line must hold besides the name)
BAD = {
  "cut.parquet": (parquet_bytes(GOOD)[: len(parquet_bytes(GOOD)) // 2], ["not a readable Parquet file"]),
  "empty.parquet": (b"", ["empty file (0 bytes)"]),
  "random.parquet": (np.random.default_rng(0).bytes(1000), ["not a readable Parquet file"]),
  "export.csv": (HTML, ["is an HTML page, not CSV"]),
  "signin.csv": (b"\xef\xbb\xbf  \n<html><body>Sign in, please</body></html>\n", ["is an HTML page, not CSV"]),
  "logs": (None, ["a folder without data files"]),
  "cut.csv.gz": (
    gzip.compress(csv_bytes(GOOD))[: len(gzip.compress(csv_bytes(GOOD))) // 2],
    ["not a readable CSV file"],
  ),
  "ragged.csv": (b"user_id,timestamp,page\nu1,1,a\nu1,2,b,extra\nu2,3,c\n", ["Expected 3 columns, got 4"]),
  "short_row.csv": (b"user_id,timestamp,page\nu1,1,a\nu1,2\n", ["Expected 3 columns, got 2"]),
  "nopage.parquet": (parquet_bytes(GOOD.drop(["page"])), ["missing required column(s) page"]),
  "nopage.csv": (csv_bytes(GOOD.drop(["page"])), ["missing required column(s) page"]),
  "texttime.csv": (b"user_id,timestamp,page\nu1,yesterday,a\nu1,today,b\n", ["'timestamp'", "'yesterday'"]),
  "listpage.parquet": (
    parquet_bytes(with_column("page", [[p] for p in GOOD["page"].to_pylist()])),
    ["column 'page' has type list<"],
  ),
  "nan.parquet": (
    parquet_bytes(with_column("timestamp", np.where(np.arange(160) % 7, seconds(), np.nan))),
    ["'timestamp' has NaN values"],
  ),
  "nan.csv": (b"user_id,timestamp,page\nu1,nan,a\nu1,2,b\n", ["'timestamp' has NaN values"]),
  "blank_time.csv": (b"user_id,timestamp,page\nu1,,a\nu1,2,b\n", ["'timestamp' has 1 null value"]),
  "negative.parquet": (
    parquet_bytes(with_column("timestamp", np.where(np.arange(160) % 9, seconds(), -1))),
    ["'timestamp' has negative values such as -1"],
  ),
  "milliseconds.parquet": (
    parquet_bytes(with_column("timestamp", seconds() * 1000)),
    ["after the year 2200", "look like milliseconds"],
  ),
  "1e13.csv": (csv_bytes(with_column("timestamp", seconds() - seconds().min() + 10**13)), ["after the year 2200"]),
  "year3000.parquet": (
    parquet_bytes(with_column("timestamp", pa.array(seconds() - seconds().min() + YEAR_3000, pa.timestamp("s")))),
    ["after the year 2200"],
  ),
  "year3000.csv": (
    b"user_id,timestamp,page\nu1,3000-01-01T00:00:00,a\nu1,3000-01-01T00:01:00,b\n",
    ["after the year 2200"],
  ),
  "year3000_text.parquet": (
    parquet_bytes(with_column("timestamp", ["3000-01-01T00:00:00Z"] * 160)),
    ["after the year 2200"],
  ),  # ISO text past 2262, when nanoseconds end
  "null_ids.parquet": (
    parquet_bytes(with_column("user_id", pa.nulls(160, pa.string()))),
    ["'user_id' has 160 null value"],
  ),
  "null_typed_ids.parquet": (parquet_bytes(with_column("user_id", pa.nulls(160))), ["'user_id' has 160 null value"]),
  "blank_ids.csv": (b"user_id,timestamp,page\n,1,a\n,2,b\n", ["'user_id' has 2 null value"]),
  "float_ids.parquet": (
    parquet_bytes(with_column("user_id", np.arange(160) // 8 + 0.5)),
    ["'user_id' has type double, expected string or integer"],
  ),
  "bool_ids.parquet": (
    parquet_bytes(with_column("user_id", np.arange(160) // 8 % 2 == 0)),
    ["'user_id' has type bool"],
  ),
  "one_user.parquet": (parquet_bytes(GOOD.slice(0, 8)), ["--k=2 is more than the 1 usable users"]),
  "one_page.parquet": (
    parquet_bytes(with_column("page", ["/home"] * 160)),
    ["every event has the same page", "'/home'"],
  ),
}
# Bad --data for `hetlm evaluate`: a trained workdir must come out of each refusal byte-for-byte unchanged.
BAD_FOR_EVALUATE = [
  "cut.parquet",
  "empty.parquet",
  "export.csv",
  "logs",
  "nopage.parquet",
  "negative.parquet",
  "milliseconds.parquet",
  "null_ids.parquet",
  "ragged.csv",
]


def write_bad(root, name: str) -> str:
  data, _ = BAD[name]
  path = root / name
  if data is None:
    path.mkdir()
  else:
    path.write_bytes(data)
  return str(path)


def snapshot(root) -> dict | None:
  """Every file and folder under `root` with a hash of its bytes; None if `root` does not exist."""
  if not os.path.exists(root):
    return None
  tree = {}
  for folder, _dirs, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    tree[rel] = "dir"
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        tree[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
  return tree


def assert_refused(capsys, workdir, args, *needles):
  """`hetlm ARGS` exits 2 with one error line holding every needle, and `workdir` is as it was."""
  before = snapshot(workdir)
  code, err = run(capsys, *args)
  assert code == 2, err
  assert len(err) == 1 and err[0].startswith("hetlm: error: "), err
  for needle in needles:
    assert needle in err[0], err[0]
  assert snapshot(workdir) == before, f"{workdir} was changed"


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_log_is_refused_naming_the_file_and_the_problem(tmp_path, capsys, name):
  path = write_bad(tmp_path, name)
  workdir = tmp_path / "run"
  assert_refused(capsys, workdir, ["train", f"--workdir={workdir}", *TINY, f"--data={path}"], name, *BAD[name][1])
  assert not workdir.exists()


@pytest.mark.parametrize(
  "flag,needle",
  [
    ("--k=0", "--k=0 must be at least 1"),
    ("--k=-1", "--k=-1 must be at least 1"),
    ("--k=21", "--k=21 is more than the 20 usable users in"),
    ("--format=bogus", "--format='bogus'"),
    ("--data_shards=3", "--data_shards=3 must be at least 1 and divide --batch_size="),
  ],
)
def test_a_bad_flag_is_refused_before_the_workdir_is_made(tmp_path, capsys, flag, needle):
  path = tmp_path / "good.parquet"
  pq.write_table(GOOD, path)
  workdir = tmp_path / "run"
  assert_refused(capsys, workdir, ["train", f"--workdir={workdir}", f"--data={path}", *TINY, flag], needle)
  assert not workdir.exists()


def odd_but_valid_log() -> pa.Table:
  """GOOD with what a real export may hold: ids that are numbers and text (7, 007, u0002...), a page name with
  control characters (NUL, tab, newline, ANSI colour, DEL), one of 10,000 characters, and duplicated rows."""
  ids = np.array(GOOD["user_id"].to_pylist(), object)
  ids[ids == "u0000"], ids[ids == "u0001"] = "7", "007"
  pages = np.array(GOOD["page"].to_pylist(), object)
  pages[pages == "/p/1"] = "/p/1\x00\t\n\x1b[31mred\x1b[0m\x7f"
  pages[pages == "/p/2"] = "/p/2" + "x" * 9_996
  table = pa.table(
    {"user_id": pa.array(ids, pa.string()), "timestamp": GOOD["timestamp"], "page": pa.array(pages, pa.string())}
  )
  return pa.concat_tables([table, table.slice(0, 24)])  # users 7, 007 and u0002 see each event twice


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained by the command line on the odd-but-valid log, saved as a CSV with a byte-order mark."""
  root = tmp_path_factory.mktemp("trained")
  data = root / "odd.csv"
  data.write_bytes(b"\xef\xbb\xbf" + csv_bytes(odd_but_valid_log()))
  workdir = root / "run"
  code = cli(["hetlm", "train", f"--workdir={workdir}", f"--data={data}", *TINY, *FAST])
  return code, data, workdir


def test_an_odd_but_valid_log_trains(trained, capsys):
  """Accepted, each as a user would expect: a spreadsheet's byte-order mark is not part of the first column's
  name; duplicate rows are real (a reload within the same second logs the same event twice) and deduplicating
  would silently change the data; CSV ids are text, so 7 and 007 are two users; a page name is any string."""
  code, data, workdir = trained
  assert code == 0
  assert (workdir / "eval.json").exists() and (workdir / "report.md").exists()
  pages = PageTokenizer.load(workdir / "tokenizer.json").tokens
  assert "/p/1\x00\t\n\x1b[31mred\x1b[0m\x7f" in pages and "/p/2" + "x" * 9_996 in pages
  users = pq.read_table(workdir / "assignments.parquet")["user_id"].to_pylist()
  assert {"7", "007", "u0002"} <= set(users) and len(users) == 20


@pytest.mark.parametrize("name", BAD_FOR_EVALUATE)
def test_evaluate_with_bad_data_leaves_the_trained_workdir_unchanged(trained, tmp_path, capsys, name):
  code, _, workdir = trained
  assert code == 0
  path = write_bad(tmp_path, name)
  assert_refused(capsys, workdir, ["evaluate", f"--workdir={workdir}", f"--data={path}"], name, *BAD[name][1])


@pytest.mark.parametrize(
  "flag,needle",
  [("--d_model=16", "--d_model: 8 there, 16 now"), ("--k=3", "--k: 2 there"), ("--data=other.parquet", "--data: ")],
)
def test_train_into_a_workdir_of_another_config_names_the_flag_and_changes_nothing(
  trained, tmp_path, capsys, flag, needle
):
  code, data, workdir = trained
  assert code == 0
  if flag.startswith("--data"):
    pq.write_table(GOOD, tmp_path / "other.parquet")
    flag = f"--data={tmp_path / 'other.parquet'}"
  assert_refused(
    capsys, workdir, ["train", f"--workdir={workdir}", f"--data={data}", *TINY, *FAST, flag], needle, str(workdir)
  )


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
  """Accepted: Excel and Notepad write a UTF-8 byte-order mark; it must not become part of the first column's
  name (then 'user_id' would be missing) nor of the first user id in the text formats."""
  plain = read_events(_write(tmp_path / "plain.csv", csv_bytes(GOOD)))
  for name, data in (
    ("bom.csv", b"\xef\xbb\xbf" + csv_bytes(GOOD)),
    ("bom.csv.gz", gzip.compress(b"\xef\xbb\xbf" + csv_bytes(GOOD))),
  ):
    table = read_events(_write(tmp_path / name, data))
    assert table.column_names == ["user_id", "timestamp", "page"] and table.equals(plain), name
  items = read_events(_write(tmp_path / "items.txt", b"\xef\xbb\xbfu1 a\nu1 b\nu2 a\nu2 c\n"))
  assert items["user_id"].to_pylist() == ["u1", "u1", "u2", "u2"]


def test_duplicate_rows_are_kept(tmp_path):
  """Accepted and kept: the same (user, second, page) twice is what a reload logs; the page is in the sequence
  twice, as it was viewed twice. Dropping them would change a valid log behind the user's back."""
  once = read_events(_write(tmp_path / "once.parquet", parquet_bytes(GOOD)))
  twice = read_events(_write(tmp_path / "twice.parquet", parquet_bytes(pa.concat_tables([GOOD, GOOD]))))
  tok = PageTokenizer.fit(once["page"])
  (seqs_once, _), (seqs, stats) = build_sequences(once, tok), build_sequences(twice, tok)
  assert stats["events_kept"] == 2 * GOOD.num_rows and seqs.num_users == 20
  assert seqs.num_tokens == seqs_once.num_tokens + GOOD.num_rows  # one more page token per event, same sessions


def test_mixed_type_user_ids(tmp_path):
  """A Parquet column has one type, so "mixed" there means ids of a type that is no id (floats, booleans: refused
  above). In a CSV ids are text, whatever they look like: 7, 007 and abc are three users, accepted."""
  path = _write(tmp_path / "mixed.csv", b"user_id,timestamp,page\n7,1,a\n7,2,b\nabc,1,a\nabc,2,b\n007,1,a\n007,2,c\n")
  table = read_events(path)
  assert table["user_id"].to_pylist() == ["7", "7", "abc", "abc", "007", "007"]
  assert table.schema.metadata[b"hetlm_user_id"] == b"string"
  seqs, _ = build_sequences(table, PageTokenizer.fit(table["page"]))
  assert sorted(seqs.user_ids) == ["007", "7", "abc"]


@pytest.mark.parametrize("page", ["/p\x00a\tb\nc\rd\x1b[31m\x7f\u2028", "/" + "long" * 2_500])
def test_odd_page_names_round_trip(tmp_path, page):
  """Accepted: a page name is any string. Control characters and 10,000-character names survive the reader,
  the tokenizer file and decoding (and a whole training run: test_an_odd_but_valid_log_trains)."""
  table = with_column("page", [page if i % 3 == 0 else p for i, p in enumerate(GOOD["page"].to_pylist())])
  for path in (_write(tmp_path / "odd.parquet", parquet_bytes(table)), _write(tmp_path / "odd.csv", csv_bytes(table))):
    events = read_events(path)
    assert events["page"].to_pylist() == table["page"].to_pylist(), path
    tok = PageTokenizer.fit(events["page"])
    tok.save(tmp_path)
    assert PageTokenizer.load(tmp_path) == tok
    seqs, _ = build_sequences(events, tok)
    assert page in tok.decode(seqs.tokens)


def test_one_session_of_100000_page_views_is_read_and_windowed_in_seconds(tmp_path):
  """Accepted: a crawler or a kiosk can log 100,000 views in one session. Reading, sessionising and cutting the
  windows that training iterates over is array arithmetic: seconds and a few MB. (A whole `hetlm train` of this
  log with the TINY flags and --init=random --nobaselines takes about 20 s of CPU: too slow for this file.)"""
  n = 100_000
  whale = pa.table(
    {
      "user_id": ["whale"] * n,
      "timestamp": np.arange(n, dtype=np.int64) + 1_600_000_000,
      "page": pa.array([f"/p/{i % 12}" for i in range(n)]),
    }
  )
  path = _write(tmp_path / "whale.parquet", parquet_bytes(pa.concat_tables([GOOD, whale])))
  start = time.perf_counter()
  table = read_events(path)
  seqs, stats = build_sequences(table, PageTokenizer.fit(table["page"]))
  owner_W, start_W, length_W, _ = all_windows(seqs, "history", 9)
  assert time.perf_counter() - start < 10
  u = list(seqs.user_ids).index("whale")
  assert seqs.n_sessions[u] == 1 and seqs.lengths[u] == n + 1  # BOS, then every view; no EOS (one session)
  assert seqs.history_lengths[u] == 1 + n - n // 2  # holdout=half
  windows = length_W[owner_W == u]
  assert windows.max() <= 9 and windows.sum() - len(windows) + 1 == seqs.history_lengths[u]  # each token once


def _write(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def test_the_error_names_the_file_as_it_was_given(tmp_path, capsys, monkeypatch):
  write_bad(tmp_path, "cut.parquet")
  monkeypatch.chdir(tmp_path)
  assert_refused(
    capsys,
    tmp_path / "run",
    ["train", "--workdir=run", *TINY, "--data=cut.parquet"],
    "hetlm: error: cut.parquet: not a readable Parquet file",
  )
  assert not (tmp_path / "run").exists()
