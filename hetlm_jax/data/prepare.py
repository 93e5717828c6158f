"""The first stage of every command that reads a log: read it, fit (or reuse) the page tokenizer, build each
user's sequence and, for the split by user (--test_users), cut off the test and validation users."""

from __future__ import annotations

import dataclasses
import time

import pyarrow.compute as pc

from hetlm_jax import interrupt
from hetlm_jax.config import Config
from hetlm_jax.data import SAMPLE_PATH
from hetlm_jax.data.readers import read_events
from hetlm_jax.data.sequences import (
  UserSequences,
  build_sequences,
  held_out_users,
  outcome_types,
  spare_users,
  split_users,
)
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.errors import HetlmError


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


def data_path(cfg: Config) -> str:
  """--data, or the msnbc sample shipped inside the package."""
  return cfg.data.path or str(SAMPLE_PATH)


def prepare_data(cfg: Config, tokenizer: PageTokenizer | None = None) -> Prepared:
  """Reads the log and builds per-user sequences; fits the tokenizer on the training histories unless one
  is given (pages seen only in held-out targets or test users are unknown to the models, so UNK)."""
  d = cfg.data
  path = data_path(cfg)
  start = time.perf_counter()
  table = read_events(path, d.format, max_users=d.max_users or None)
  interrupt.at_phase("prepare")
  given = tokenizer is not None
  if not given:  # every page for now; which events train is known only once the sequences are built
    outcomes = outcome_types(table)
    if not outcomes and pc.count_distinct(table["page"]).as_py() < 2:
      raise HetlmError(
        f"{path}: every event has the same page ({table['page'][0].as_py()[:60]!r}), so there is "
        "nothing to predict; is 'page' the right column?"
      )
    tokenizer = PageTokenizer.fit(table["page"], outcomes)
  holdout = "none" if d.test_users else d.holdout
  seqs, stats = build_sequences(table, tokenizer, session_gap_s=d.session_gap_minutes * 60, holdout=holdout)
  int_ids = (table.schema.metadata or {}).get(b"hetlm_user_id") == b"int64"
  test_seqs = val_seqs = None
  if d.test_users:
    if (
      d.train_users + d.test_users > seqs.num_users
      or seqs.num_users - d.test_users < 1
      or d.test_offset + d.test_users > seqs.num_users
    ):
      offset = f", --test_offset={d.test_offset}" if d.test_offset >= 0 else ""
      raise HetlmError(
        f"{path}: {seqs.num_users:,} users, too few for --train_users={d.train_users} and "
        f"--test_users={d.test_users}{offset}"
      )
    spare = spare_users(
      seqs.num_users,
      d.train_users,
      d.test_users,
      round(cfg.train.val_frac * d.train_users),
      d.split_seed,
      d.test_offset,
    )
    val_seqs = None if spare is None or not len(spare) else held_out_users(seqs, spare)
    seqs, test_seqs = split_users(seqs, d.train_users, d.test_users, d.split_seed, d.test_offset)
    stats.update(users=seqs.num_users, test_users=test_seqs.num_users, test_tokens=test_seqs.num_tokens)
  if not given:
    # A training user's history is all that trains (split_users makes a training user's whole sequence
    # history); min_count and max_vocab apply to those counts.
    counts_V = seqs.history_counts(tokenizer.vocab_size)
    stats["pages_never_in_training"] = int((counts_V[tokenizer.num_specials :] == 0).sum())
    tokenizer, map_V = tokenizer.restrict(counts_V, d.min_count, d.max_vocab or None)
    seqs = seqs.map_tokens(map_V)
    test_seqs, val_seqs = (None if x is None else x.map_tokens(map_V) for x in (test_seqs, val_seqs))
  interrupt.safe_point("while preparing the data", "nothing was written")
  return Prepared(seqs, tokenizer, stats, time.perf_counter() - start, int_ids, test_seqs, val_seqs)
