"""--data from where logs live: a folder of part files (hidden files and hive folders as Spark writes them), a
glob, a list, a file:// URI and an s3:// URI on a local S3-compatible server (moto) read the same events as the
single file; bad sources are refused in one line."""

import gzip
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from synthetic import markov_events
from tiny_run import assert_same_result, train_args

from hetlm_jax.data.readers import EventStream, read_events
from hetlm_jax.errors import HetlmError
from hetlm_jax.main import cli

KEYS = [("user_id", "ascending"), ("timestamp", "ascending"), ("page", "ascending")]


def events():
  return markov_events(n_users=40, n_groups=2, sessions=2, session_len=4)[0]


def spread(table, parts):
  """`parts` tables, each with rows of every user (row i goes to part i % parts)."""
  return [table.take(list(range(i, table.num_rows, parts))) for i in range(parts)]


def spark_folder(root, table, parts=4):
  """A Spark-like export: hive date folders, part files, _SUCCESS, .crc files and a _temporary folder."""
  for i, piece in enumerate(spread(table, parts)):
    folder = root / f"date=2024-01-0{i % 2 + 1}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(piece, folder / f"part-{i:05d}-abc.snappy.parquet")
    (folder / f".part-{i:05d}-abc.snappy.parquet.crc").write_bytes(b"crc")
  (root / "_SUCCESS").write_bytes(b"")
  (root / "_temporary").mkdir()
  (root / "_temporary" / "junk.parquet").write_bytes(b"not parquet")
  return root


def same_events(a, b):
  assert a.sort_by(KEYS).equals(b.sort_by(KEYS))


def test_a_folder_a_glob_a_list_and_a_file_uri_read_what_the_single_file_holds(tmp_path):
  table = events()
  pq.write_table(table, tmp_path / "one.parquet")
  whole = read_events(tmp_path / "one.parquet")
  folder = spark_folder(tmp_path / "export", table)
  parts = sorted(str(p) for p in folder.rglob("part-*.parquet"))
  for data in (folder, f"{folder}/*/part-*.parquet", ",".join(parts), f"file://{folder}"):
    got = read_events(data)
    same_events(got, whole)
    assert got.schema.metadata[b"hetlm_source"] == str(data).encode()
    assert got.schema.metadata[b"hetlm_user_id"] == whole.schema.metadata[b"hetlm_user_id"]
    streamed = pa.concat_tables(EventStream(data, batch_rows=7))
    same_events(streamed, whole)
    assert EventStream(data).total_rows == table.num_rows
  # Gzipped CSV parts without a suffix-less guess, and a hive column the files lack.
  csv = tmp_path / "csv"
  for i, piece in enumerate(spread(table.drop_columns(["page"]), 3)):
    (csv / "page=p").mkdir(parents=True, exist_ok=True)
    with gzip.open(csv / "page=p" / f"part-{i}.csv.gz", "wb") as f:
      pacsv.write_csv(piece, f)
  got = read_events(csv)
  assert got.num_rows == table.num_rows and set(got["page"].to_pylist()) == {"p"}


def test_a_training_run_on_a_folder_of_parts_ends_as_the_run_on_the_single_file(tiny_reference, tmp_path, capsys):
  log, reference = tiny_reference
  folder = spark_folder(tmp_path / "export", pq.read_table(log))
  assert cli(["hetlm", *train_args(folder, tmp_path / "run")]) == 0
  capsys.readouterr()
  assert_same_result(reference, tmp_path / "run", unlike=("data",))


def test_an_s3_uri_on_a_local_server_reads_what_the_single_file_holds(s3_endpoint, tmp_path):
  table = events()
  pq.write_table(table, tmp_path / "one.parquet")
  s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)
  s3.create_dir("logs")
  for i, piece in enumerate(spread(table, 4)):
    pq.write_table(piece, f"logs/export/part-{i}.parquet", filesystem=s3)
  with s3.open_output_stream("logs/export/_SUCCESS") as f:
    f.write(b"")
  query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
  got = read_events(f"s3://logs/export{query}")
  same_events(got, read_events(tmp_path / "one.parquet"))
  assert got.schema.metadata[b"hetlm_source"] == f"s3://logs/export{query}".encode()
  with pytest.raises(HetlmError, match=r"^s3://logs/nothing: no such file or folder$"):
    read_events(f"s3://logs/nothing{query}")
  with pytest.raises(HetlmError, match=r"^s3://logs/export: cannot reach it \(.*Could not connect"):  # no server
    read_events("s3://logs/export?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")


@pytest.mark.parametrize(
  ("make", "needle"),
  [
    (lambda root: root, "a folder without data files"),
    (lambda root: f"{root}/*.csv", "matches no file"),
    (lambda root: f"{root}/*.parquet", "matches 1 empty file(s) only"),
    (lambda root: f"{root}/missing", "no such file or folder"),
    (lambda root: "gopher://host/x", "cannot open this URI"),
  ],
)
def test_an_empty_folder_a_glob_matching_nothing_or_an_unknown_scheme_is_one_error_line(tmp_path, make, needle):
  root = tmp_path / "empty"
  root.mkdir()
  (root / "_SUCCESS").write_bytes(b"")
  (root / "part-0.parquet").write_bytes(b"")  # an empty part, as an export of no rows may leave
  with pytest.raises(HetlmError) as e:
    read_events(make(root))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_parts_with_clashing_schemas_or_a_text_format_over_parts_are_refused_naming_the_part(tmp_path):
  table = events()
  root = tmp_path / "clash"
  root.mkdir()
  a, b = spread(table, 2)
  pq.write_table(a, root / "part-0.parquet")
  pq.write_table(
    b.set_column(0, "user_id", pa.array([int(u[1:]) for u in b["user_id"].to_pylist()])), root / "part-1.parquet"
  )
  for read in (read_events, lambda p: list(EventStream(p))):
    with pytest.raises(HetlmError, match=r"part-1.parquet: column 'user_id' is integer here but string in .*part-0"):
      read(root)
  with pytest.raises(HetlmError, match="--format=msnbc reads one file"):
    read_events(root, "msnbc")


def test_the_cli_refuses_a_bad_source_in_one_line_and_writes_nothing(tmp_path, capsys):
  (tmp_path / "logs").mkdir()
  code = cli(["hetlm", "train", f"--data={tmp_path / 'logs'}/*.csv", f"--workdir={tmp_path / 'run'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "matches no file" in err[0], err
  assert not (tmp_path / "run").exists()


def test_a_workdir_or_out_on_a_store_without_its_library_is_one_line_and_never_a_local_folder(
  tmp_path, monkeypatch, capsys
):
  """pathlib would make gs://bucket/run the local folder gs:/bucket/run; without the cloud extra the command says
  what to install instead (a run on a store: tests/test_object_store.py)."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  monkeypatch.setitem(sys.modules, "s3fs", None)
  for args, needs in (
    (["train", "--workdir=gs://bucket/run"], "gcsfs"),
    (["evaluate", "--workdir=s3://bucket/run"], "s3fs"),
    (["predict", f"--workdir={tmp_path}", "--data=x.parquet", "--out=gs://bucket/p.parquet"], "gcsfs"),
  ):
    assert cli(["hetlm", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs {needs}: pip install 'hetlm_jax[cloud]'" in err[0], err
  assert not list(tmp_path.iterdir())  # no folder named gs: or s3:
