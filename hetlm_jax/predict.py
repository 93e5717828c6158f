"""Using a trained model: the Predictor API (a notebook's handful of histories) and `hetlm predict` (a file of
users' recent events, streamed in chunks, one Parquet row per user).

A history is a list of page names (one session), a list of sessions (lists of page names), or a list of page
names with `session_ids` marking their sessions. It goes through the training's tokenizer and sequence layout
(pages the models never saw become <unk>), then what follows it is asked for: the next session when the run's
training data end their sessions, else (one session per user, as msnbc) how the last session goes on
(sessions.json; `new_session=` overrides it).

Routing is the training's: a user of the saved assignment keeps their cluster (pass `user_ids`), any other goes
to the model with the lowest per-token NLL of their history (the E-step's rule); the posterior P(k | history) ∝
π_k p_k(history) is the one the mixture evaluation uses. Next pages are ranked as the evaluation ranks them (the
same batches, the same candidates: pages, not specials, outcome tokens or <unk>); outcome chances are estimated
as the evaluation estimates them (sampled continuations). Every call runs on fixed batch shapes and a few
prompt widths, so repeated calls do not recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging
from scipy.special import logsumexp

from hetlm_jax import interrupt
from hetlm_jax.cluster.assign import cluster_shares, log_shares
from hetlm_jax.cluster.policy import Position
from hetlm_jax.data.buckets import (
  BucketWriter,
  bucket_count,
  bucket_path,
  grouped_chunks,
  read_bucket,
  sort_by_user,
)
from hetlm_jax.data.readers import EventStream
from hetlm_jax.data.sequences import UserSequences, build_sequences, prediction_view
from hetlm_jax.data.tokenizer import UNK
from hetlm_jax.errors import HetlmError
from hetlm_jax.eval.evaluate import EvalOptions, group_batches, outcome_probabilities, posterior, route
from hetlm_jax.eval.generate import Sampling, generate
from hetlm_jax.files import Location, check_bucket, inside, is_uri, location, make_dir, replace_text, written
from hetlm_jax.lock import workdir_lock
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import Progress
from hetlm_jax.train.split import num_models
from hetlm_jax.workdir import (
  CONFIG_FILE,
  SavedAssignment,
  is_finished,
  load_run,
  locate,
  read_sessions,
)

__all__ = ["Continuations", "NextPages", "Predictor", "Routing", "Scores", "predict_file"]


@dataclasses.dataclass(frozen=True)
class Routing:
  """`assign`'s answer for N histories and K models."""

  cluster: np.ndarray  # [U] int32: the saved cluster of a known user, else the lowest per-token history NLL
  posterior: np.ndarray  # [U, K] P(k | history), rows summing to 1
  unknown_pages: np.ndarray  # [U] history pages the models never saw (scored as <unk>)
  saved: np.ndarray  # [U] bool: the cluster is the saved assignment's (a training user)


@dataclasses.dataclass(frozen=True)
class NextPages:
  """`next_pages`' answer: the k most likely next pages of each history, most likely first."""

  pages: list[list[str]]  # [U][Y] page names
  probs: np.ndarray  # [U, Y] their probabilities under the routed model (or the posterior-weighted mixture)
  ids: np.ndarray  # [U, Y] their token ids
  cluster: np.ndarray  # [U] the routed model
  unknown_pages: np.ndarray  # [U]


@dataclasses.dataclass(frozen=True)
class Scores:
  """`score`'s answer: how well each model predicts each history (nats per token), an anomaly score."""

  nll_per_token: np.ndarray  # [U, K] under every model
  tokens: np.ndarray  # [U] scored tokens of each history
  cluster: np.ndarray  # [U] the routed model
  nll: np.ndarray  # [U] under the routed model
  nll_mixture: np.ndarray  # [U] −log Σ_k π_k p_k(history) per token
  unknown_pages: np.ndarray  # [U]

  @property
  def perplexity(self) -> np.ndarray:
    """[U, K] exp(nll_per_token)."""
    return np.exp(self.nll_per_token)


class Continuations(list):
  """`generate`'s answer: a list of what follows each history (token names: pages, and outcome tokens such as
  <cart>), which also carries the routed model `cluster` [U] and `unknown_pages` [U] of each history."""

  def __init__(self, tokens: list[list[str]], cluster: np.ndarray, unknown_pages: np.ndarray):
    super().__init__(tokens)
    self.cluster, self.unknown_pages = cluster, unknown_pages


class Predictor:
  """A trained model family, ready for new events. Build it with `Predictor.load`. `k`: its models;
  `clusters_equal_to_init` [K] bool: those that are the init LM HeTLM started from; `same_model`: groups of
  clusters that are one model (a new user among them goes to the one holding most training users)."""

  def __init__(self, workdir: Path, run, devices=None):
    self.workdir, self.tokenizer, self.config = workdir, run.tokenizer, run.config
    self.k = num_models(run.params)
    self.params, self.step = run.params, run.step
    self.trainer = run.trainer if run.trainer is not None else Trainer(run.config, self.k, devices)
    self.log_prior = log_shares(cluster_shares(run.assignment, run.weights, self.k, mine=False))
    position = Position.from_meta(run.meta)
    has_shared = bool(jax.tree.leaves(run.params["shared"]))
    # Clusters that are one model tie on every history; a new user goes to the one holding most training users.
    self.same_model = position.same_model_groups(self.k)
    self.clusters_equal_to_init = np.isin(np.arange(self.k), position.clusters_as_init(self.k, has_shared))
    self.saved = SavedAssignment(workdir) if self.k > 1 else None
    sessions = read_sessions(workdir)
    self.new_session, self.session_length = bool(sessions["session_ends"]), sessions["session_length"]
    self.label = "routing"  # the scoring pass's progress line (None: quiet)

  @classmethod
  def load(cls, path: str | os.PathLike, model: str = "hetlm", devices=None) -> Predictor:
    """From a finished run's workdir (`model`: hetlm, single, single_ft or single_matched), or from a checkpoint
    folder WORKDIR/checkpoints/MODEL[/STEP]; onto `devices` (default: every local device; CPU works)."""
    workdir, family, step = locate(location(path))
    if not workdir.is_dir():
      raise HetlmError(f"{path}: no such workdir")
    if family is None and not is_finished(workdir) and (workdir / CONFIG_FILE).exists():
      raise HetlmError(
        f"{workdir}: not a finished run (no eval.json); the `hetlm train` command that made it resumes it"
      )
    devices = list(jax.local_devices() if devices is None else devices)
    return cls(workdir, load_run(workdir, family or model, step, devices), devices)

  # -- histories → sequences --------------------------------------------------------------------------------

  def sequences(
    self, histories: Sequence, session_ids: Sequence | None = None, new_session: bool | None = None
  ) -> tuple[UserSequences, np.ndarray]:
    """The histories as the models read them, each followed by what is asked for, and [U] unknown pages."""
    return self.events_view(_events_of(histories, session_ids), new_session)

  def events_view(self, table: pa.Table, new_session: bool | None = None) -> tuple[UserSequences, np.ndarray]:
    """`sequences` of an event table (the columns of a log) instead of lists of pages."""
    gap = self.config.data.session_gap_minutes * 60
    seqs, _ = build_sequences(table, self.tokenizer, session_gap_s=gap, holdout="none")
    seqs = prediction_view(seqs, self.new_session if new_session is None else new_session)
    unknown_U = np.add.reduceat((seqs.tokens == UNK).astype(np.int64), seqs.offsets[:-1])
    return seqs, unknown_U

  # -- what the models say about them ----------------------------------------------------------------------

  def route_users(self, seqs: UserSequences, user_ids=None):
    """(cluster [U], log posterior [K, U], history NLL sums [K, U], scored tokens [U], saved [U])."""
    history_KxU, tokens_U = self.trainer.score(self.params, seqs, "history", label=self.label)
    cluster_U = route(history_KxU, tokens_U)
    for group in self.same_model:
      cluster_U = np.where(np.isin(cluster_U, group), group[int(np.argmax(self.log_prior[group]))], cluster_U)
    saved_U = np.zeros(seqs.num_users, bool)
    if user_ids is not None:
      user_ids = _as_list(user_ids, "user_ids")
      if len(user_ids) != seqs.num_users:
        raise HetlmError(f"user_ids: {len(user_ids)} ids for {seqs.num_users} histories")
    if self.saved is not None and user_ids is not None:
      known_U = self.saved.lookup(np.asarray(user_ids))
      saved_U = known_U >= 0
      cluster_U = np.where(saved_U, known_U, cluster_U).astype(np.int32)
    return cluster_U, posterior(self.log_prior, history_KxU), history_KxU, tokens_U, saved_U

  def top_pages(self, seqs: UserSequences, cluster_U, log_post_KxU, k: int, mixture: bool):
    """[U, Y] ids and probabilities of the most likely next pages, batched as the evaluation ranks."""
    first_page = self.tokenizer.num_specials
    k = min(k, self.tokenizer.vocab_size - first_page)
    ids_UxY = np.zeros((seqs.num_users, k), np.int64)
    probs_UxY = np.zeros((seqs.num_users, k), np.float32)
    groups_U = np.zeros(seqs.num_users, np.int64) if mixture else cluster_U
    for users in group_batches(groups_U, seqs.history_lengths, self.trainer.eval_batch):
      if mixture:
        logp_BxV = logsumexp(
          log_post_KxU[:, users, None] + self.trainer.next_logprobs(self.params, seqs, users), axis=0
        )
      else:
        logp_BxV = self.trainer.next_logprobs(self.params, seqs, users, cluster_U[users])
      logp_BxV = np.where(np.arange(logp_BxV.shape[1]) >= first_page, logp_BxV, -np.inf)
      top_BxY = np.argpartition(-logp_BxV, k - 1, axis=1)[:, :k]
      value_BxY = np.take_along_axis(logp_BxV, top_BxY, axis=1)
      order_BxY = np.argsort(-value_BxY, axis=1, kind="stable")
      ids_UxY[users] = np.take_along_axis(top_BxY, order_BxY, axis=1)
      probs_UxY[users] = np.exp(np.take_along_axis(value_BxY, order_BxY, axis=1))
    return ids_UxY, probs_UxY

  def _sampling(self, sampling: Sampling | None) -> Sampling:
    """The evaluation's decoding: greedy, at most 20 tokens, or a session's median length when the model never
    saw a session end."""
    s = sampling or Sampling()
    return s if self.session_length is None else dataclasses.replace(s, max_new=min(s.max_new, self.session_length))

  # -- the API ---------------------------------------------------------------------------------------------

  def assign(
    self,
    histories: Sequence,
    session_ids: Sequence | None = None,
    user_ids: Sequence | None = None,
    new_session: bool | None = None,
  ) -> Routing:
    """Each history's cluster (`user_ids` in the saved assignment keep theirs) and P(k | history)."""
    seqs, unknown_U = self.sequences(histories, session_ids, new_session)
    cluster_U, log_post_KxU, _, _, saved_U = self.route_users(seqs, user_ids)
    return Routing(cluster_U, np.exp(log_post_KxU).T, unknown_U, saved_U)

  def next_pages(
    self,
    histories: Sequence,
    k: int = 10,
    mixture: bool = False,
    session_ids: Sequence | None = None,
    user_ids: Sequence | None = None,
    new_session: bool | None = None,
  ) -> NextPages:
    """The k most likely next pages of each history under its routed model, or under the mixture of all K
    weighted by P(k | history) (`mixture`)."""
    k = self.checked_k(k)
    seqs, unknown_U = self.sequences(histories, session_ids, new_session)
    cluster_U, log_post_KxU, *_ = self.route_users(seqs, user_ids)
    ids_UxY, probs_UxY = self.top_pages(seqs, cluster_U, log_post_KxU, k, mixture)
    pages = [self.tokenizer.decode(row) for row in ids_UxY]
    return NextPages(pages, probs_UxY, ids_UxY, cluster_U, unknown_U)

  def score(self, histories: Sequence, session_ids: Sequence | None = None, user_ids: Sequence | None = None) -> Scores:
    """Each history's NLL per token under every model, its routed model and the mixture."""
    seqs, unknown_U = self.sequences(histories, session_ids)
    cluster_U, _, history_KxU, tokens_U, _ = self.route_users(seqs, user_ids)
    per_token_KxU = history_KxU / np.maximum(tokens_U, 1)
    mixture_U = -logsumexp(self.log_prior[:, None] - history_KxU, axis=0) / np.maximum(tokens_U, 1)
    routed_U = per_token_KxU[cluster_U, np.arange(len(cluster_U))]
    return Scores(per_token_KxU.T, tokens_U, cluster_U, routed_U, mixture_U, unknown_U)

  def checked_k(self, k) -> int:
    """`k` pages to list, once it is a whole number of at least 1; more than the run knows lists them all."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise HetlmError(f"k={k!r}: expected a whole number of pages, at least 1")
    pages = self.tokenizer.vocab_size - self.tokenizer.num_specials
    if k > pages:
      logging.warning("k=%d: the run knows %d pages, so all %d are listed", k, pages, pages)
    return int(min(k, pages))

  def outcome_probability(
    self,
    histories: Sequence,
    samples: int = 8,
    session_ids: Sequence | None = None,
    user_ids: Sequence | None = None,
    seed: int = 0,
  ) -> dict[str, np.ndarray]:
    """{outcome type: [U] P(the outcome in what follows)}, from `samples` continuations per history sampled from
    its routed model, as the evaluation estimates it. Only for a run trained with outcome events."""
    if not self.tokenizer.outcome_types:
      raise HetlmError(
        f"{self.workdir}: the run was trained without outcome events (no event_type other than "
        "views), so it predicts no outcome"
      )
    seqs, _ = self.sequences(histories, session_ids)
    cluster_U, *_ = self.route_users(seqs, user_ids)
    return self._outcomes(seqs, cluster_U, samples, seed)

  def _outcomes(self, seqs: UserSequences, cluster_U: np.ndarray, samples: int, seed: int) -> dict[str, np.ndarray]:
    opts = EvalOptions(outcome_samples=samples, seed=seed)
    return outcome_probabilities(
      self.config.model, self.params, seqs, cluster_U, np.arange(seqs.num_users), self.tokenizer, opts, self.trainer.mix
    )

  def generate(
    self,
    histories: Sequence,
    sampling: Sampling | None = None,
    session_ids: Sequence | None = None,
    user_ids: Sequence | None = None,
    seed: int = 0,
  ) -> Continuations:
    """What follows each history, generated by its routed model (batched, KV-cached; `hetlm generate`'s
    decoding), as token names (pages, and outcome tokens such as <cart>)."""
    if sampling is not None and not isinstance(sampling, Sampling):
      raise HetlmError(f"sampling: expected hetlm_jax.Sampling(...), got {type(sampling).__name__}")
    seqs, unknown_U = self.sequences(histories, session_ids)
    cluster_U, *_ = self.route_users(seqs, user_ids)
    out = generate(
      self.config.model,
      self.params,
      seqs,
      cluster_U,
      np.arange(seqs.num_users),
      self._sampling(sampling),
      seed=seed,
      mix=self.trainer.mix,
    )
    return Continuations([self.tokenizer.decode(tokens) for tokens in out], cluster_U, unknown_U)


def _events_of(histories: Sequence, session_ids: Sequence | None) -> pa.Table:
  """The histories as an event table (user i, timestamps in order, one session_id per session); one clear
  HetlmError for an empty history or a page that is not a name."""
  histories = _as_list(histories, "histories")
  if not histories:
    raise HetlmError("histories: expected a non-empty list of histories (each a list of page names)")
  session_ids = None if session_ids is None else _as_list(session_ids, "session_ids")
  if session_ids is not None and len(session_ids) != len(histories):
    raise HetlmError(f"session_ids: {len(session_ids)} lists for {len(histories)} histories")
  users, pages, sessions = [], [], []
  for i, history in enumerate(histories):
    history = _as_list(history, f"history {i}", "a non-empty list of page names (or of sessions)")
    if not history:
      raise HetlmError(f"history {i}: expected a non-empty list of page names (or of sessions), got []")
    nested = all(_listlike(s) for s in history)
    history = [_as_list(s, f"history {i}") for s in history] if nested else history
    flat = [page for s in history for page in s] if nested else list(history)
    if nested:
      ids = [j for j, s in enumerate(history) for _ in s]
    elif session_ids is not None:
      ids = list(session_ids[i])
      if len(ids) != len(flat):
        raise HetlmError(f"history {i}: {len(flat)} pages but {len(ids)} session ids")
    else:
      ids = [0] * len(flat)
    if not flat:
      raise HetlmError(f"history {i}: every session is empty")
    for j, page in enumerate(flat):
      if isinstance(page, bool) or not isinstance(page, (str, int, np.integer)):
        raise HetlmError(f"history {i}, page {j}: expected a page name (str), got {type(page).__name__} {page!r:.40}")
    users += [i] * len(flat)
    pages += [str(page) for page in flat]
    sessions += ids
  try:
    codes = pa.array(sessions).dictionary_encode().indices.cast(pa.int64())
  except pa.ArrowException as e:
    raise HetlmError(f"session_ids: {e}") from None
  return pa.table(
    {
      "user_id": pa.array(users, pa.int64()),
      "timestamp": pa.array(np.arange(len(users)), pa.int64()),
      "page": pa.array(pages, pa.string()),
      "session_id": codes,
    }
  )


def _listlike(x) -> bool:
  """A list, a tuple, a numpy array or a pandas Series (anything with tolist()), but not a string or a number."""
  return not isinstance(x, (str, bytes, np.generic)) and (isinstance(x, Sequence) or hasattr(x, "tolist"))


def _as_list(x, what: str, expected: str = "a list") -> list:
  """`x` as a list (numpy arrays and pandas Series by their tolist()), or one HetlmError naming `what`."""
  if not _listlike(x):
    raise HetlmError(f"{what}: expected {expected}, got {type(x).__name__} {x!r:.60}")
  value = x.tolist() if hasattr(x, "tolist") and not isinstance(x, Sequence) else list(x)
  if not isinstance(value, list):  # a 0-d array's tolist() is a scalar
    raise HetlmError(f"{what}: expected {expected}, got a single {type(value).__name__}")
  return value


# -- hetlm predict ---------------------------------------------------------------------------------------------


def _schema(int_ids: bool, outcomes: list[str]) -> pa.Schema:
  fields = [
    ("user_id", pa.int64() if int_ids else pa.string()),
    ("cluster", pa.int32()),
    ("posterior", pa.list_(pa.float32())),
    ("next_pages", pa.list_(pa.string())),
    ("next_page_probs", pa.list_(pa.float32())),
    ("nll_per_token", pa.float32()),
    ("unknown_pages", pa.int32()),
  ]
  return pa.schema(fields + [(f"outcome_{o}", pa.float32()) for o in outcomes])


def _rows(
  predictor: Predictor, table: pa.Table, int_ids: bool, top_k: int, mixture: bool, outcome_samples: int, seed: int
) -> pa.Table:
  seqs, unknown_U = predictor.events_view(table)
  ids = seqs.user_ids
  cluster_U, log_post_KxU, history_KxU, tokens_U, _ = predictor.route_users(seqs, ids)
  ids_UxY, probs_UxY = predictor.top_pages(seqs, cluster_U, log_post_KxU, top_k, mixture)
  u, n = ids_UxY.shape
  names = pa.array(predictor.tokenizer.decode(ids_UxY.ravel()), pa.string())
  offsets = pa.array(np.arange(u + 1, dtype=np.int32) * n)
  k = predictor.k
  columns = {
    "user_id": pa.array(ids.astype(np.int64) if int_ids else ids.astype(str)),
    "cluster": pa.array(cluster_U, pa.int32()),
    "posterior": pa.ListArray.from_arrays(
      pa.array(np.arange(u + 1, dtype=np.int32) * k), pa.array(np.exp(log_post_KxU).T.ravel().astype(np.float32))
    ),
    "next_pages": pa.ListArray.from_arrays(offsets, names),
    "next_page_probs": pa.ListArray.from_arrays(offsets, pa.array(probs_UxY.ravel())),
    "nll_per_token": pa.array((history_KxU[cluster_U, np.arange(u)] / np.maximum(tokens_U, 1)).astype(np.float32)),
    "unknown_pages": pa.array(unknown_U.astype(np.int32)),
  }
  if predictor.tokenizer.outcome_types and outcome_samples:
    for outcome, prob in predictor._outcomes(seqs, cluster_U, outcome_samples, seed).items():
      columns[f"outcome_{outcome}"] = pa.array(prob.astype(np.float32))
  return pa.table(columns, schema=_schema(int_ids, predictor.tokenizer.outcome_types if outcome_samples else []))


def _peak_rss_mib() -> float:
  """This process's peak resident memory: Linux's VmHWM (its own, unlike ru_maxrss, which a child started by
  fork and exec inherits from its parent), else ru_maxrss."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
  except (OSError, StopIteration, ValueError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def part_path(out: Path, process: int, processes: int) -> Path:
  """Where a process writes: --out itself in a one-process job, else OUT/part-0000P.parquet (a folder, with a
  _SUCCESS manifest written last by process 0)."""
  return out if processes == 1 else out / f"part-{process:05d}.parquet"


DEFAULT_MEMORY_MB = 1024  # hetlm predict's --memory_mb: the events one process holds at a time, in memory


class _Chunks:
  """The chunks of users process `process` of `processes` predicts, as (chunk, seed) pairs; `done` of `total` events
  is the progress of the predicting pass, `stats` how the log was grouped."""

  def __init__(self, stream: EventStream, chunk_users: int, process: int, processes: int, seed: int):
    self.stream, self.chunk_users, self.seed = stream, chunk_users, seed
    self.process, self.processes = process, processes
    self.total, self.done, self.stats = 1, 0, {}


class _InFileOrder(_Chunks):
  """--grouped: chunks of whole users in file order (process p of P predicts chunks p, p + P, ...); one pass, and
  a user seen again after their chunk is one error line. Yields (chunk or None when another process's, seed)."""

  def __init__(self, *args):
    super().__init__(*args)
    self.total = self.stream.count_rows()  # the progress: events read of the file's
    self.stats = {"mode": "file order", "buckets": 0}

  def __iter__(self):
    for i, chunk in enumerate(grouped_chunks(_conformed(self.stream), self.chunk_users, self.stream.path)):
      self.done += chunk.num_rows
      yield (chunk if i % self.processes == self.process else None), self.seed + i


class _ByBucket(_Chunks):
  """The default: the log in any order, grouped by user first (data/buckets.py). When the whole log fits in
  `memory_bytes` it is read and sorted in memory (no files); else a first pass writes its events into buckets by
  user hash (process p of P keeps buckets p, p + P, ...) in `folder`, and the second predicts one bucket at a time.
  Chunks are a bucket's users in id order and a chunk's seed depends on its bucket and place only, so the rows do
  not depend on the file's order, its parts or the processes. Yields (chunk, seed)."""

  def __init__(self, stream, chunk_users, process, processes, seed, folder: Path, memory_bytes: int, buckets: int):
    super().__init__(stream, chunk_users, process, processes, seed)  # total: this process's events, once grouped
    self.folder, self.memory_bytes, self.buckets = folder, memory_bytes, buckets
    self.stats = {"mode": "buckets", "buckets": buckets}

  def _seed(self, bucket: int, j: int) -> int:
    return (self.seed + 100_003 * bucket + j) % 2**31

  def __iter__(self):
    start = self._started = time.perf_counter()
    events = self.stream.count_rows()
    pieces = iter(self.stream)
    first = next(pieces, None)
    if first is None:
      return
    b = self.buckets or bucket_count(events, first.nbytes / first.num_rows, self.memory_bytes)
    self.stats["buckets"] = b
    mine = [bucket for bucket in range(b) if bucket % self.processes == self.process]
    interrupt.at_phase("bucket")
    if b == 1:
      self.stats["mode"] = "in memory"
      tables = [first, *self._reading(pieces, first, events, None)] if mine else []
      self._first_pass(start, events if mine else 0)
      self.total = sum(t.num_rows for t in tables)
      self.stats["largest_bucket_mib"] = sum(t.nbytes for t in tables) / 2**20
      sorted_ = [sort_by_user(pa.concat_tables(tables))] if tables else []
      del tables
      yield from self._chunks(sorted_, 0)
      return
    self.folder.mkdir(parents=True, exist_ok=True)
    keep_B = np.arange(b) % self.processes == self.process
    writer = BucketWriter(self.folder, b, keep_B, self.memory_bytes // 2)
    try:
      writer.add(first)
      for _ in self._reading(pieces, first, events, writer):
        pass
    except BaseException:  # a stop or a bad part: nothing more is written (the folder is removed)
      writer.close(flush=False)
      raise
    written_ = writer.close()
    pa.default_memory_pool().release_unused()  # the pass's buffers, kept by the allocator otherwise
    self._first_pass(start, events)
    self.total = int(written_.rows_B.sum())
    self.stats["largest_bucket_mib"] = float(written_.bytes_B.max()) / 2**20
    for bucket in mine:
      table = read_bucket(self.folder, bucket)
      if table is not None:
        yield from self._chunks([table], bucket)
        bucket_path(self.folder, bucket).unlink()

  def _reading(self, pieces, first: pa.Table, events: int, writer: BucketWriter | None):
    """The first pass: every piece after the first, into `writer` (else yielded), with its own progress line."""
    progress = Progress(events, "predict, grouping the log by user (events)", every=20)
    read, schema = first.num_rows, first.schema
    for piece in pieces:
      piece, schema = _conform(piece, schema, self.stream.path)
      if writer is None:
        yield piece
      else:
        writer.add(piece)
      read += piece.num_rows
      rate = read / max(time.perf_counter() - self._started, 1e-9)
      progress.update(read, f"{rate:,.0f} events/s")
      interrupt.safe_point(
        f"after reading {read:,} events", "nothing was written (the predictions are written whole or not at all)"
      )
    progress.close()

  def _first_pass(self, start: float, events: int) -> None:
    if self.stream.parsed_whole:  # read before the pass began: its speed would be the slicing's
      return
    seconds = time.perf_counter() - start
    self.stats.update(bucket_pass_s=seconds, bucket_events_per_s=events / max(seconds, 1e-9))

  def _chunks(self, tables: list[pa.Table], bucket: int):
    for j, chunk in enumerate(grouped_chunks(tables, self.chunk_users, self.stream.path, checked=False)):
      self.done += chunk.num_rows
      yield chunk, self._seed(bucket, j)


def _conform(table: pa.Table, schema: pa.Schema | None, name: str) -> tuple[pa.Table, pa.Schema]:
  """`table` in the columns and types of the first piece (`schema`; None: this is it), so pieces of several parts
  concatenate; a part with other columns is one error line."""
  if schema is None or table.schema.equals(schema):
    return table, table.schema
  if table.column_names != schema.names:
    raise HetlmError(
      f"{name}: a part has the columns {', '.join(table.column_names)} where an earlier one has "
      f"{', '.join(schema.names)}: give every part the same event columns"
    )
  return table.cast(schema), schema


def _conformed(stream: EventStream) -> Iterator[pa.Table]:
  """The stream's pieces, each in the first one's columns and types (_conform)."""
  schema = None
  for piece in stream:
    piece, schema = _conform(piece, schema, stream.path)
    yield piece


def _scratch(out: Location, process: int, processes: int) -> Path:
  """The bucket files' folder: beside --out (a hidden name), or inside the parts' folder; for an --out on an
  object store, in the local temporary folder."""
  if is_uri(out):
    tag = hashlib.sha256(os.fspath(out).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"hetlm-predict-{tag}.buckets-{process:05d}"
  return out.parent / f".{out.name}.buckets" if processes == 1 else out / f".buckets-{process:05d}"


def predict_file(
  workdir: str | os.PathLike,
  data: str | os.PathLike,
  out: str | os.PathLike,
  fmt: str = "auto",
  model: str = "hetlm",
  top_k: int = 10,
  mixture: bool = False,
  chunk_users: int = 4096,
  outcome_samples: int = 8,
  seed: int = 0,
  process: int = 0,
  processes: int = 1,
  devices=None,
  grouped: bool = False,
  memory_mb: int = DEFAULT_MEMORY_MB,
  buckets: int = 0,
) -> dict:
  """`hetlm predict`: one Parquet row per user of `data`, predicted in chunks of `chunk_users` users. The log may be
  in any order: it is grouped by user first (_ByBucket), in memory when it fits in `memory_mb`, else through
  bucket files (`buckets`: how many; 0 chooses). `grouped`: the log's users are already together, so it is read
  once in file order (_InFileOrder). Rows go to a temporary file renamed at the end: an error or a stop signal
  leaves no output and no bucket file (interrupt.Stopped). Returns a summary (users, seconds, users/s, the
  grouping, peak RSS per chunk)."""
  out = location(out, "--out")
  if chunk_users < 1 or top_k < 1 or outcome_samples < 0:
    raise HetlmError("--chunk_users and --top_k must be at least 1, --outcome_samples at least 0")
  if memory_mb < 1 or buckets < 0:
    raise HetlmError(f"--memory_mb={memory_mb} --buckets={buckets}: expected at least 1 MiB and 0 or more buckets")
  if processes == 1 and out.suffix.lower() not in (".parquet", ".pq"):  # several processes write a folder
    raise HetlmError(f"--out={out}: predictions are written as Parquet; name the file *.parquet")
  if is_uri(out):
    check_bucket(out, "--out")
  elif not out.parent.is_dir():
    raise HetlmError(f"--out={out}: no folder {out.parent} to write it in")
  # Read 16 events per user of a chunk at a time (Parquet: within a row group), so memory follows --chunk_users.
  stream = EventStream(data, fmt, 16 * chunk_users)  # checks the file before the model loads
  with interrupt.stop_handler(), contextlib.ExitStack() as held:  # a stop while loading is a stop too
    predictor = Predictor.load(workdir, model, devices)
    predictor.label = None
    if predictor.tokenizer.outcome_types and outcome_samples == 0:
      logging.info("--outcome_samples=0: no outcome_* columns")
    target = part_path(out, process, processes)
    make_dir(target.parent)
    schema = _schema(stream.int_ids, predictor.tokenizer.outcome_types if outcome_samples else [])
    # Writing into a run's workdir (e.g. OUT=WORKDIR/predictions.parquet): hold it, as train and evaluate do.
    if process == 0 and inside(target, predictor.workdir):
      held.enter_context(workdir_lock(predictor.workdir, "predict"))
    tmp = held.enter_context(written(target, hidden=True))  # renamed over target only if every chunk is written
    if grouped:
      chunks = _InFileOrder(stream, chunk_users, process, processes, seed)
    else:
      folder = _scratch(out, process, processes)
      shutil.rmtree(folder, ignore_errors=True)  # left by a killed run
      held.callback(shutil.rmtree, folder, ignore_errors=True)  # removed at the end, on an error and on a stop
      chunks = _ByBucket(stream, chunk_users, process, processes, seed, folder, memory_mb * 2**20, buckets)
    start, users, chunk_count, rss, progress = time.perf_counter(), 0, 0, [], None
    unknown = pages = 0
    clusters = np.zeros(predictor.k, np.int64)
    with contextlib.closing(pq.ParquetWriter(tmp, schema)) as writer:
      for i, (chunk, chunk_seed) in enumerate(chunks):
        if progress is None:  # after the grouping pass, if any: its ETA is this pass's own
          progress = held.enter_context(contextlib.closing(Progress(chunks.total, "predict (events)", every=1)))
          predicting = time.perf_counter()
        if chunk is not None:
          if not chunk_count and (predictor.tokenizer.encode_pages(chunk["page"]) == UNK).all():
            raise HetlmError(
              f"{data}: none of the first {chunk.num_rows:,} events' pages is one the run was "
              f"trained on ({predictor.tokenizer.vocab_size - predictor.tokenizer.num_specials:,} "
              "pages); is it the same kind of log, and 'page' the right column?"
            )
          rows = _rows(predictor, chunk, stream.int_ids, top_k, mixture, outcome_samples, chunk_seed)
          writer.write_table(rows)
          users += rows.num_rows
          clusters += np.bincount(rows["cluster"].to_numpy(), minlength=predictor.k)
          unknown += int(pc.sum(rows["unknown_pages"]).as_py() or 0)
          pages += chunk.num_rows
          chunk_count += 1
          rss.append(round(_peak_rss_mib(), 1))
        elapsed = time.perf_counter() - predicting
        progress.update(chunks.done, f"{users:,} users, {users / max(elapsed, 1e-9):,.0f} users/s")
        interrupt.after_step(i + 1)
        interrupt.safe_point(
          f"after {users:,} users", "nothing was written (the predictions are written whole or not at all)"
        )
  seconds = time.perf_counter() - start
  summary = {
    "users": users,
    "events": pages,
    "chunks": chunk_count,
    "seconds": seconds,
    "users_per_s": users / max(seconds, 1e-9),
    "clusters": clusters.tolist(),
    "unknown_pages": unknown,
    "peak_rss_mib": rss,
    "out": str(target),
    "k": predictor.k,
    **chunks.stats,
  }
  if processes > 1:
    _manifest(out, process, processes, summary, seconds)
  return summary


def _manifest(out: Path, process: int, processes: int, summary: dict, seconds: float) -> None:
  """Each process records its part; process 0 waits for every part, then writes _SUCCESS last."""
  replace_text(out / f".part-{process:05d}.json", json.dumps(summary))
  if process:
    return
  deadline = time.monotonic() + max(600.0, 2 * seconds)
  parts = [out / f".part-{p:05d}.json" for p in range(processes)]
  while not all(p.exists() for p in parts):
    if time.monotonic() > deadline:
      missing = [str(p.name)[1:-5] for p in parts if not p.exists()]
      raise HetlmError(f"{out}: parts {', '.join(missing)} did not finish; no _SUCCESS written")
    time.sleep(0.5)
  records = [json.loads(p.read_text()) for p in parts]
  manifest = {
    "parts": [Path(r["out"]).name for r in records],
    "users": sum(r["users"] for r in records),
    "processes": processes,
  }
  replace_text(out / "_SUCCESS", json.dumps(manifest, indent=1) + "\n")
  for p in parts:
    p.unlink()
