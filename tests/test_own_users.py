"""--own_users: each process of a job keeps, trains, scores and evaluates only the users it owns (no exchange after
preparation), and ends as one process holding every user does."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_sources import spark_folder
from tiny_run import assert_readable_as, assert_same_result, hetlm_process, train_args, write_log

from hetlm_jax.data.ownership import owners
from hetlm_jax.workdir import read_assignments

OWN = ("--own_users", "--split=hash", "--data_shards=2")


@pytest.fixture(scope="module")
def own_reference(tmp_path_factory):
  """The tiny run with --own_users on a folder of 4 parts with every user spread over them, by one process with four
  devices (which holds every user, as without the flag)."""
  root = tmp_path_factory.mktemp("own_reference")
  folder = spark_folder(root / "export", pq.read_table(write_log(root / "log.parquet")))
  done = hetlm_process(train_args(folder, root / "run", *OWN))
  assert done.returncode == 0, done.stderr[-3000:]
  return folder, root / "run"


def _kept(stderr: str) -> list[int]:
  """The users each process kept, as each counted its own (the preparation's log line)."""
  return json.loads(re.search(r"the processes keep (\[[\d, ]+\]) users", stderr)[1])


def test_two_processes_with_own_users_hold_disjoint_users_and_end_as_one_process(own_reference, tmp_path):
  folder, reference = own_reference
  done = hetlm_process(train_args(folder, tmp_path / "two", *OWN), processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  users = sorted(set(pq.read_table(folder)["user_id"].to_pylist()))
  owned = np.bincount(owners(pa.array(users), 2), minlength=2)
  # each process went on with exactly the users it owns, and wrote them, and no other, to prepared/
  assert _kept(done.stderr) == owned.tolist(), done.stderr[-3000:]
  parts = [
    pq.read_table(p, columns=["user_id"])["user_id"] for p in sorted((tmp_path / "two" / "prepared").glob("part-*"))
  ]
  assert [set(owners(ids, 2)) for ids in parts] == [{0}, {1}]
  assert sorted(x for ids in parts for x in ids.to_pylist()) == users
  assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
  # The same assignment and evaluation (per-user figures brought together), within float tolerance: the sums of
  # the validation and the evaluation run over the users in another order.
  assert_same_result(reference, tmp_path / "two", rtol=1e-5, unlike=("data",))
  # the Predictor reads the assignment's parts; `hetlm evaluate` on two processes writes the same evaluation again
  assert_readable_as(reference, tmp_path / "two")
  assert_same_result(reference, tmp_path / "two", rtol=1e-5, unlike=("data",))


def test_own_users_resume_after_a_stop_in_the_e_step_on_as_many_processes_only(own_reference, tmp_path):
  """SIGTERM in preparation writes nothing; SIGTERM in the first E-step: each process's users' clusters and soft
  weights are saved in its own rows of the checkpoint; the same two processes resume to the uninterrupted end, and
  one process is refused in one line."""
  folder, reference = own_reference
  args = train_args(folder, tmp_path / "run", *OWN)
  stopped = hetlm_process([*args, "--inject=sigterm@prepare"], processes=2, devices=2)
  assert stopped.returncode == 0 and "The same command resumes" in stopped.stdout, stopped.stderr[-3000:]
  assert not (tmp_path / "run" / "prepared").exists()
  stopped = hetlm_process([*args, "--inject=sigterm@estep"], processes=2, devices=2)
  assert stopped.returncode == 0 and "The same command resumes" in stopped.stdout, stopped.stderr[-3000:]
  one = hetlm_process(args)
  lines = one.stderr.strip().splitlines()
  assert one.returncode == 2 and "saved by 2 processes each holding its own users" in lines[-1], one.stderr[-3000:]
  written = {p: p.read_bytes() for p in (tmp_path / "run" / "prepared").iterdir()}
  four = hetlm_process(args, processes=4, devices=1)
  lines = four.stderr.strip().splitlines()
  assert four.returncode == 2 and "prepared by 2 process(es)" in lines[-1], four.stderr[-3000:]
  assert {p: p.read_bytes() for p in (tmp_path / "run" / "prepared").iterdir()} == written
  done = hetlm_process(args, processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_result(reference, tmp_path / "run", rtol=1e-5, unlike=("data",))
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  rounds = [r for r in records if r["kind"] == "round"]
  assert rounds and all(sum(r["sizes"]) == len(read_assignments(reference)) for r in rounds)


def test_own_users_split_by_user_ends_as_one_process(own_reference, tmp_path):
  """The split by user: each process cuts its own users by their places among every process's (the smallest keys
  gathered), validates on its spare users and evaluates its own test users; the same as one process. The clusters
  start from k-means on the init LM's hidden states, each process embedding its own users."""
  folder, _ = own_reference
  split = ("--test_users=30", "--train_users=60", "--init=embedding", "--init_rounds=1")
  one = hetlm_process(train_args(folder, tmp_path / "one", *OWN, *split))
  assert one.returncode == 0, one.stderr[-3000:]
  two = hetlm_process(train_args(folder, tmp_path / "two", *OWN, *split), processes=2, devices=2)
  assert two.returncode == 0, two.stderr[-3000:]
  assert_same_result(tmp_path / "one", tmp_path / "two", rtol=1e-5, unlike=("data",))
  report = json.loads((tmp_path / "two" / "eval.json").read_text())
  assert report["n_users"] == 30 and report["train_users"] == 60 and report["early_stopping"]["validation_users"] == 6
  parts = sorted((tmp_path / "two" / "prepared").glob("part-*"))
  roles = pa.concat_tables([pq.read_table(p, columns=["user_id", "role"]) for p in parts])
  roles = roles.group_by("role").aggregate([("user_id", "count")])
  assert dict(zip(roles["role"].to_pylist(), roles["user_id_count"].to_pylist())) == {"users": 60, "test": 30, "val": 6}


def test_own_users_with_parts_by_user_keep_each_process_s_parts_users_and_train_them_all(own_reference, tmp_path):
  """With --parts_by_user a process's users are those of its own parts, not those of its hash: it keeps, trains,
  writes and evaluates them all."""
  from test_ownership import _by_user_parts

  folder, reference = own_reference
  table = pq.read_table(folder)
  bucketed = _by_user_parts(tmp_path / "bucketed", table)
  args = train_args(bucketed, tmp_path / "two", *OWN, "--parts_by_user")
  done = hetlm_process(args, processes=2, devices=2)
  assert done.returncode == 0, done.stderr[-3000:]
  users = sorted(set(table["user_id"].to_pylist()))
  by_part = [users[0::4] + users[2::4], users[1::4] + users[3::4]]  # process p opens parts p and p + 2
  assert _kept(done.stderr) == [len(mine) for mine in by_part], done.stderr[-3000:]
  parts = sorted((tmp_path / "two" / "prepared").glob("part-*"))
  assert [sorted(pq.read_table(p, columns=["user_id"])["user_id"].to_pylist()) for p in parts] == [
    sorted(mine) for mine in by_part
  ]
  trained = read_assignments(tmp_path / "two")
  assert sorted(trained["user_id"].to_pylist()) == sorted(read_assignments(reference)["user_id"].to_pylist())
  report = json.loads((tmp_path / "two" / "eval.json").read_text())
  assert report["n_users"] == json.loads((reference / "eval.json").read_text())["n_users"]


def test_own_users_needs_the_hash_split_and_one_shard_per_process(tmp_path):
  log = write_log(tmp_path / "log.parquet")
  bad = hetlm_process(train_args(log, tmp_path / "a", "--own_users"))
  assert bad.returncode == 2 and "--own_users needs --split=hash" in bad.stderr.strip().splitlines()[-1], bad.stderr
  bad = hetlm_process(train_args(log, tmp_path / "b", "--own_users", "--split=hash"), processes=2, devices=2)
  assert bad.returncode == 2 and "--data_shards=1 must be the number of processes, 2" in bad.stderr, bad.stderr[-3000:]
  assert not (tmp_path / "b").exists()
