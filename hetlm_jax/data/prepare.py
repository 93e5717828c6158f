"""The first stage of every command that reads a log: read it, fit (or reuse) the page tokenizer, build each
user's sequence and, for the split by user (--test_users), cut off the test and validation users."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from absl import logging

from hetlm_jax import hosts, interrupt
from hetlm_jax.config import Config
from hetlm_jax.data import SAMPLE_PATH
from hetlm_jax.data.readers import read_events
from hetlm_jax.data.sequences import (
  NO_USERS_LEFT,
  UserSequences,
  build_sequences,
  held_out_users,
  outcome_types,
  spare_users,
  split_own_users,
  split_users,
  user_order,
)
from hetlm_jax.data.sources import resolve
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.errors import HetlmError, input_error


@dataclasses.dataclass
class Prepared:
  """The data of a run, ready for the models."""

  seqs: UserSequences
  tokenizer: PageTokenizer
  stats: dict
  seconds: float
  int_user_ids: bool  # the input's user ids were integers (assignments.parquet keeps them so)
  test_seqs: UserSequences | None = None  # the split by user (--test_users): new users, whole sequences
  val_seqs: UserSequences | None = None  # split by user: unused users after the test users, for validation
  saved: bool = False  # read from the workdir's prepared/ (workdir.read_prepared), not from the log


def data_path(cfg: Config) -> str:
  """--data, or the msnbc sample shipped inside the package."""
  return cfg.data.path or str(SAMPLE_PATH)


def prepare_data(cfg: Config, tokenizer: PageTokenizer | None = None) -> Prepared:
  """Reads the log and builds per-user sequences; fits the tokenizer on the training histories unless one
  is given (pages seen only in held-out targets or test users are unknown to the models, so UNK).

  In a job of several processes each reads only the events of the users it owns (data/ownership.py; with
  --parts_by_user, the users of its own part files, and no other part is opened), counts
  their pages and builds their sequences; the page counts are summed over the processes, so the tokenizer is the
  one a single process fits on the whole log. With --own_users each process goes on with its own users alone (in id
  order); otherwise the sequences are exchanged and put in id order, so every process goes on with the very data one
  process would have (see docs/SCALING.md for what that costs)."""
  d = cfg.data
  path = data_path(cfg)
  start = time.perf_counter()
  process, processes = hosts.share()
  if processes > 1 and d.max_users:
    raise HetlmError(
      f"--max_users={d.max_users} keeps the first users in the order of the file, which the {processes} processes "
      "of this job, each reading only its own users, cannot know: leave it out, or cut the log first"
    )
  if processes > 1:  # each reads its own users' share of the same files, so the files must be the same
    listing = json.dumps([d.format] + [[part.name, part.size] for part in resolve(path).parts]).encode()
    digest = np.frombuffer(hashlib.sha256(listing).digest(), np.uint8)
    hosts.check_same(f"{path}: the input (its files and their sizes)", digest)
  table = read_events(
    path, d.format, max_users=d.max_users or None, share=(process, processes), parts_by_user=d.parts_by_user
  )
  interrupt.at_phase("prepare")
  given = tokenizer is not None
  if not given:  # every page for now; which events train is known only once the sequences are built
    tokenizer = _page_tokenizer(table, path)
  holdout = "none" if d.test_users else d.holdout
  seqs, stats = build_sequences(
    table, tokenizer, session_gap_s=d.session_gap_minutes * 60, holdout=holdout, allow_empty=processes > 1
  )
  int_ids = (table.schema.metadata or {}).get(b"hetlm_user_id") == b"int64"
  del table
  hosts.set_own_users(d.own_users)
  if processes > 1 and d.own_users:  # each process goes on with its own users
    seqs, stats = seqs.in_id_order(), _summed_stats([json.dumps(stats).encode()], [seqs.num_users])
    if not sum(stats["users_by_process"]):
      raise input_error(path, NO_USERS_LEFT)
    logging.info("--own_users: the processes keep %s users of %s", stats["users_by_process"], stats["users"])
  elif processes > 1:
    seqs, stats = _exchanged(seqs, stats, path)
  test_seqs = val_seqs = None
  (users,) = hosts.total(np.array(seqs.num_users))  # with --own_users, every process's
  if d.test_users and (
    d.train_users + d.test_users > users or users - d.test_users < 1 or d.test_offset + d.test_users > users
  ):
    offset = f", --test_offset={d.test_offset}" if d.test_offset >= 0 else ""
    raise HetlmError(
      f"{path}: {int(users):,} users, too few for --train_users={d.train_users} and --test_users={d.test_users}{offset}"
    )
  if d.test_users and hosts.own_users():
    n_val = round(cfg.train.val_frac * d.train_users)
    seqs, test_seqs, val_seqs = split_own_users(
      seqs, int(users), d.train_users, d.test_users, n_val, d.split_seed, d.test_offset
    )
    train_users, test_users, test_tokens = hosts.total(
      np.array(seqs.num_users), np.array(test_seqs.num_users), np.array(test_seqs.num_tokens)
    )
    stats.update(users=int(train_users), test_users=int(test_users), test_tokens=int(test_tokens))
  elif d.test_users:
    order = user_order(seqs.user_ids, d.split_seed, d.split)  # the users' random order, once for both cuts
    spare = spare_users(
      seqs.num_users,
      d.train_users,
      d.test_users,
      round(cfg.train.val_frac * d.train_users),
      d.split_seed,
      d.test_offset,
      order,
    )
    val_seqs = None if spare is None or not len(spare) else held_out_users(seqs, spare)
    seqs, test_seqs = split_users(seqs, d.train_users, d.test_users, d.split_seed, d.test_offset, order)
    stats.update(users=seqs.num_users, test_users=test_seqs.num_users, test_tokens=test_seqs.num_tokens)
  if not given:
    # A training user's history is all that trains (split_users makes a training user's whole sequence
    # history); min_count and max_vocab apply to those counts.
    (counts_V,) = hosts.total(seqs.history_counts(tokenizer.vocab_size))
    stats["pages_never_in_training"] = int((counts_V[tokenizer.num_specials :] == 0).sum())
    tokenizer, map_V = tokenizer.restrict(counts_V, d.min_count, d.max_vocab or None)
    seqs = seqs.map_tokens(map_V)
    test_seqs, val_seqs = (None if x is None else x.map_tokens(map_V) for x in (test_seqs, val_seqs))
  interrupt.safe_point("while preparing the data", "nothing was written")
  return Prepared(seqs, tokenizer, stats, time.perf_counter() - start, int_ids, test_seqs, val_seqs)


def _page_tokenizer(table: pa.Table, path: str) -> PageTokenizer:
  """The tokenizer of every page of the log, from this process's events and, in a job of several, the page counts
  and outcome types of every process's."""
  counts = pc.value_counts(table["page"])
  mine = pa.table({"page": counts.field("values"), "count": counts.field("counts")})
  outcomes = outcome_types(table)
  if hosts.share()[1] > 1:
    every = hosts.gather_tables(mine)
    mine = pa.concat_tables(every).group_by("page").aggregate([("count", "sum")]).rename_columns(["page", "count"])
    outcomes = sorted(
      {o for blob in hosts.gather_bytes(json.dumps(outcomes).encode()) for o in json.loads(bytes(blob))}
    )
  if not outcomes and mine.num_rows < 2:
    raise HetlmError(
      f"{path}: every event has the same page ({mine['page'][0].as_py()[:60]!r}), so there is "
      "nothing to predict; is 'page' the right column?"
    )
  return PageTokenizer.from_counts(mine["page"], mine["count"], outcomes)


def _exchanged(seqs: UserSequences, stats: dict, path: str) -> tuple[UserSequences, dict]:
  """Every process's users (their UserSequences.to_table sent as Arrow IPC), in id order, and the summed counts."""
  parts, every_stats = [], []
  mine = [hosts.to_ipc(seqs.to_table()), json.dumps(stats).encode()]
  for blob in hosts.gather_bytes(b"".join(len(x).to_bytes(8, "little") + x for x in mine)):
    users_blob, stats_blob = _framed(blob)
    parts.append(UserSequences.from_table(hosts.from_ipc(users_blob)))
    every_stats.append(bytes(stats_blob))
  totals = _summed_stats(every_stats, [part.num_users for part in parts])
  seqs = UserSequences.concat(parts).in_id_order()
  if not seqs.num_users:
    raise input_error(path, NO_USERS_LEFT)
  twice = np.flatnonzero(seqs.user_ids[1:] == seqs.user_ids[:-1])
  if len(twice):  # only with --parts_by_user: users owned by hash are in one process's share
    raise input_error(
      path,
      f"--parts_by_user: user {seqs.user_ids[twice[0]]!r} has events in the parts of two processes, so the parts "
      "do not hold whole users; leave --parts_by_user out (every process then reads every part)",
    )
  return seqs, totals


def _summed_stats(every: list[bytes], users: list[int]) -> dict:
  """The preparation's counts summed over the processes, from every process's stats (JSON), or, given this process's
  alone, gathered first; with each process's number of users."""
  if len(every) == 1 and hosts.share()[1] > 1:
    every = [bytes(blob) for blob in hosts.gather_bytes(every[0])]
    users = [int(n) for (n,) in hosts.gather_arrays(np.array(users[0]))]
  totals = {}
  for blob in every:
    for key, value in json.loads(blob).items():
      totals[key] = value if isinstance(value, str) else totals.get(key, 0) + value
  return {**totals, "users_by_process": users}


def _framed(blob) -> list[memoryview]:
  """The pieces (views, not copies) of a blob laid out as (8-byte little-endian length, bytes) after each other."""
  blob, pieces, at = memoryview(blob), [], 0
  while at < len(blob):
    size = int.from_bytes(blob[at : at + 8], "little")
    pieces.append(blob[at + 8 : at + 8 + size])
    at += 8 + size
  return pieces
