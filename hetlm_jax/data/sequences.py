"""Per-user token sequences with a temporal held-out target, built with array arithmetic only.

Sequence of a user: their events sorted by (timestamp, original row) and cut into sessions; each
session becomes [BOS, tokens..., EOS], where every event emits its page token and, for an outcome
event (any event_type other than VIEW_EVENTS, case-insensitive; null means a view), also the
outcome token right after the page token. Sessions: with a `session_id` column, events sharing a
(user, session_id) form one session and sessions are ordered by their first timestamp; without
one, a new session starts when the gap to the user's previous event exceeds `session_gap_s`.

Held-out target (the split), per user:
  * >= 2 sessions: the last session, BOS and EOS included, is the target; earlier ones the history.
  * 1 session with n event tokens, holdout="half": target = the last n//2 tokens, history = BOS +
    the first n - n//2; holdout="last": target = the last event's tokens. "auto" means "last" for
    user_items input (SASRec's protocol), else "half". Such a session has no EOS: its end lies in
    the held-out part, so no training history of single-session data could ever show one.
  * 1 session with fewer than 2 events: dropped, counted as users_dropped_too_short.
  holdout="none" (whole sequences, for a split by user: see `split_users`): no target (split = end),
  every session ends in EOS, and every user with an event is kept.

Users are ordered by id: numerically when every id is a decimal integer, else by string, so the
result does not depend on row order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetlm_jax import hosts
from hetlm_jax.data.ownership import smallest_keys, user_keys
from hetlm_jax.data.readers import normalise_events
from hetlm_jax.data.tokenizer import BOS, EOS, PAD, PageTokenizer
from hetlm_jax.errors import HetlmError, input_error

VIEW_EVENTS = ("view", "click", "clicks", "page_view", "pageview")
HOLDOUTS = ("auto", "half", "last", "none")


@dataclasses.dataclass(frozen=True, eq=False)
class UserSequences:
  """Flat token array of all users; user u's tokens are tokens[offsets[u]:offsets[u+1]]."""

  user_ids: np.ndarray  # [U] object (str)
  tokens: np.ndarray  # [N] int32
  offsets: np.ndarray  # [U+1] int64
  split: np.ndarray  # [U] int64, absolute index where user u's target begins
  n_sessions: np.ndarray  # [U] int32

  def __post_init__(self):
    u = len(self.user_ids)
    if self.offsets.shape != (u + 1,) or self.split.shape != (u,) or self.n_sessions.shape != (u,):
      raise ValueError("user_ids, offsets, split and n_sessions disagree on the number of users")

  @property
  def num_users(self) -> int:
    """U, the number of users."""
    return len(self.user_ids)

  @property
  def num_tokens(self) -> int:
    """N, the tokens of every user together."""
    return int(self.offsets[-1])

  @property
  def lengths(self) -> np.ndarray:
    """[U] tokens per user, history and target."""
    return np.diff(self.offsets)

  @property
  def history_lengths(self) -> np.ndarray:
    """[U] tokens of each user's history."""
    return self.split - self.offsets[:-1]

  @property
  def target_lengths(self) -> np.ndarray:
    """[U] tokens of each user's held-out target."""
    return self.offsets[1:] - self.split

  def history(self, u: int) -> np.ndarray:
    """User u's history tokens."""
    return self.tokens[self.offsets[u] : self.split[u]]

  def target(self, u: int) -> np.ndarray:
    """User u's held-out target tokens."""
    return self.tokens[self.split[u] : self.offsets[u + 1]]

  def subset(self, idx: np.ndarray) -> UserSequences:
    """The users `idx` (indices or a boolean mask), in that order."""
    idx_R = np.asarray(idx)
    if idx_R.dtype == bool:
      idx_R = np.flatnonzero(idx_R)
    idx_R = idx_R.astype(np.int64)
    start_R, end_R = self.offsets[idx_R], self.offsets[idx_R + 1]
    new_offsets = np.zeros(len(idx_R) + 1, np.int64)
    np.cumsum(end_R - start_R, out=new_offsets[1:])
    shift_R = start_R - new_offsets[:-1]
    tokens = np.empty(int(new_offsets[-1]), self.tokens.dtype)
    # Gathered a few million tokens at a time: the index arrays of the whole would take 24 bytes a token.
    cuts = np.unique(np.append(np.searchsorted(new_offsets[1:], np.arange(0, len(tokens), 1 << 22)), len(idx_R)))
    for a, b in zip(np.append(0, cuts[:-1]), cuts):
      lo, hi = new_offsets[a], new_offsets[b]
      tokens[lo:hi] = self.tokens[np.arange(lo, hi) + np.repeat(shift_R[a:b], end_R[a:b] - start_R[a:b])]
    return UserSequences(
      user_ids=self.user_ids[idx_R],
      tokens=tokens,
      offsets=new_offsets,
      split=self.split[idx_R] - shift_R,
      n_sessions=self.n_sessions[idx_R],
    )

  def map_tokens(self, map_V: np.ndarray) -> UserSequences:
    """The same sequences with every token id t replaced by map_V[t] (e.g. a restricted vocabulary)."""
    return dataclasses.replace(self, tokens=np.asarray(map_V, np.int32)[self.tokens])

  @classmethod
  def empty(cls) -> UserSequences:
    """No users."""
    z = np.zeros(0, np.int64)
    return cls(np.array([], object), np.zeros(0, np.int32), np.zeros(1, np.int64), z, np.zeros(0, np.int32))

  @classmethod
  def concat(cls, parts: list[UserSequences]) -> UserSequences:
    """The users of every part, part after part."""
    base_P = np.cumsum([0] + [x.num_tokens for x in parts])
    return cls(
      user_ids=np.concatenate([x.user_ids for x in parts]),
      tokens=np.concatenate([x.tokens for x in parts]).astype(np.int32),
      offsets=np.concatenate([[0]] + [x.offsets[1:] + b for x, b in zip(parts, base_P)]).astype(np.int64),
      split=np.concatenate([x.split + b for x, b in zip(parts, base_P)]).astype(np.int64),
      n_sessions=np.concatenate([x.n_sessions for x in parts]).astype(np.int32),
    )

  def to_table(self) -> pa.Table:
    """The users as an Arrow table: user_id, tokens (one list a user), split (where the target begins, counted
    from the user's first token) and n_sessions; `from_table` reads it back."""
    return pa.table(
      {
        "user_id": pa.array(self.user_ids.astype(str), pa.string()),
        "tokens": pa.LargeListArray.from_arrays(pa.array(self.offsets), pa.array(self.tokens, pa.int32())),
        "split": pa.array(self.split - self.offsets[:-1], pa.int64()),
        "n_sessions": pa.array(self.n_sessions, pa.int32()),
      }
    )

  @classmethod
  def from_table(cls, table: pa.Table) -> UserSequences:
    """The users of a `to_table` table (other columns are ignored)."""
    offsets = np.zeros(table.num_rows + 1, np.int64)
    np.cumsum(pc.list_value_length(table["tokens"]).to_numpy(), out=offsets[1:])
    return cls(
      user_ids=table["user_id"].to_numpy(zero_copy_only=False).astype(object),
      tokens=pc.list_flatten(table["tokens"]).to_numpy().astype(np.int32),
      offsets=offsets,
      split=offsets[:-1] + table["split"].to_numpy(),
      n_sessions=table["n_sessions"].to_numpy().astype(np.int32),
    )

  def in_id_order(self) -> UserSequences:
    """The same users in build_sequences' order of their ids (numeric when every id is a decimal integer)."""
    order_U = id_order(pa.array(self.user_ids, pa.string()))
    return self if (order_U == np.arange(self.num_users)).all() else self.subset(order_U)

  def history_counts(self, vocab_size: int) -> np.ndarray:
    """[V] occurrences of every token id in the users' histories: the tokens the models train on."""
    in_history_N = np.arange(self.num_tokens) < np.repeat(self.split, self.lengths)
    return np.bincount(self.tokens[in_history_N], minlength=vocab_size)


def session_length_from_data(seqs: UserSequences, num_specials: int) -> int | None:
  """How many pages to generate when the model cannot know when a session ends: None when the training
  histories hold end markers (the model learns to stop); otherwise (msnbc: one session per user, cut in two)
  the median number of pages of a history session (with --own_users, of every process's users: every process
  must call it at the same point)."""
  in_history = np.arange(seqs.num_tokens) < np.repeat(seqs.split, seqs.lengths)
  tokens = seqs.tokens[in_history]
  if hosts.own_users():
    if hosts.any_process(bool((tokens == EOS).any())):
      return None
  elif (tokens == EOS).any() or not len(tokens):
    return None
  starts = np.zeros(len(tokens), bool)
  starts[np.cumsum(seqs.history_lengths)[:-1]] = True  # a new user starts a new session too
  session = np.cumsum(starts | (tokens == BOS))
  pages = np.bincount(session, weights=tokens >= num_specials)
  if hosts.own_users():  # the median of every process's sessions, from their summed histogram of pages
    pages = pages[pages > 0].astype(np.int64)
    hist = np.bincount(pages, minlength=hosts.most(int(pages.max(initial=0))) + 1)
    (hist,) = hosts.total(hist)
    n, at = int(hist.sum()), np.cumsum(hist)
    if not n:
      return None
    middle = np.searchsorted(at, [(n - 1) // 2, n // 2], side="right")
    return max(1, int(middle.mean()))
  return max(1, int(np.median(pages[pages > 0]))) if (pages > 0).any() else None


def routing_split(seqs: UserSequences, frac: float) -> UserSequences:
  """Every user's history alone, its last `frac` of tokens (rounded up, at least one where the history has
  three or more) made the target: the models train on what is left (the history part) and users are routed
  by how well each model predicts the target part, tokens no model trained on. Histories of one or two
  tokens keep them all for training (no target: such a user is not routed)."""
  hist_U = seqs.history_lengths
  tail_U = np.where(hist_U >= 3, np.minimum(np.ceil(frac * hist_U).astype(np.int64), hist_U - 2), 0)
  history = seqs.subset(np.arange(seqs.num_users))
  keep_N = np.arange(seqs.num_tokens) < np.repeat(seqs.split, seqs.lengths)  # history tokens only
  offsets = np.zeros(seqs.num_users + 1, np.int64)
  np.cumsum(hist_U, out=offsets[1:])
  return dataclasses.replace(history, tokens=history.tokens[keep_N], offsets=offsets, split=offsets[1:] - tail_U)


def prediction_view(seqs: UserSequences, new_session: bool) -> UserSequences:
  """Whole sequences (holdout="none") made ready to predict what follows each: a user's history is all of
  their events, and their target one placeholder token. `new_session`: every session ends, and the placeholder
  is the BOS of the next (the models predict its first page; a run trained on data with session ends). Else the
  last session's end marker is dropped and the placeholder is PAD: the models continue that session, as a run
  trained on single-session users (msnbc) learnt to."""
  drop_N = np.zeros(seqs.num_tokens, bool)
  if not new_session:
    ends_U = seqs.offsets[1:] - 1
    drop_N[ends_U[seqs.tokens[ends_U] == EOS]] = True
  kept_U = seqs.lengths - np.add.reduceat(drop_N, seqs.offsets[:-1]) if seqs.num_users else seqs.lengths
  tokens = np.insert(seqs.tokens[~drop_N], np.cumsum(kept_U), BOS if new_session else PAD).astype(np.int32)
  offsets = np.zeros(seqs.num_users + 1, np.int64)
  np.cumsum(kept_U + 1, out=offsets[1:])
  return dataclasses.replace(seqs, tokens=tokens, offsets=offsets, split=offsets[1:] - 1)


def user_order(user_ids: np.ndarray, seed: int, split: str = "permutation") -> np.ndarray:
  """The seeded random order of the users that the split by user cuts: `permutation`,
  numpy.random.default_rng(seed).permutation(U) of the users in id order (needs every user; the protocol of the
  published msnbc figures); `hash`, the users by `ownership.user_keys(id, seed)`, ties in id order (a user's key
  is its id's alone, so a process can place its users without the others')."""
  if split == "hash":
    return np.argsort(user_keys(pa.array(user_ids, pa.large_string()), seed), kind="stable")
  return np.random.default_rng(seed).permutation(len(user_ids))


def split_order(
  num_users: int, n_train: int, n_test: int, seed: int, test_offset: int = -1, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(the other users, the test users) of the split by user, in the order of `order` (default
  numpy.random.default_rng(seed).permutation(U); see `user_order`): the test users are the n_test from position
  test_offset (-1: right after the first n_train), so runs with different n_train can share one test set."""
  perm = np.random.default_rng(seed).permutation(num_users) if order is None else order
  at = n_train if test_offset < 0 else test_offset
  return np.concatenate([perm[:at], perm[at + n_test :]]), perm[at : at + n_test]


def split_users(
  seqs: UserSequences, n_train: int, n_test: int, seed: int, test_offset: int = -1, order: np.ndarray | None = None
) -> tuple[UserSequences, UserSequences]:
  """The split by user (split_order, in `order`: see `user_order`): the first n_train of the other users train
  (0: all of them), the test users are held out. Training users keep their whole sequence as history; a test
  user's target is everything after the opening BOS."""
  rest, test = split_order(seqs.num_users, n_train, n_test, seed, test_offset, order)
  train = seqs.subset(rest[:n_train] if n_train else rest)
  return dataclasses.replace(train, split=train.offsets[1:].copy()), held_out_users(seqs, test)


def split_own_users(
  seqs: UserSequences, total: int, n_train: int, n_test: int, n_val: int, seed: int, test_offset: int = -1
) -> tuple[UserSequences, UserSequences, UserSequences | None]:
  """`split_users` and `spare_users` in the order of `user_order(..., "hash")`, for this process's users alone
  (--own_users; `total`: every process's users): (training users, test users, validation users or None), each in
  that order. A user's place among every process's users comes from the keys below the last place a cut needs,
  gathered from each process (its smallest ones: at most that many keys a process, never every user's when
  --train_users is given); every process must call this at the same point. Two users of one key (a 64-bit
  collision) would share a place."""
  keys_R = user_keys(pa.array(seqs.user_ids.astype(str), pa.large_string()), seed)
  order_R = np.argsort(keys_R, kind="stable")  # this process's users in the order of all, ties in id order
  at = n_train if test_offset < 0 else test_offset
  spare = bool(n_train and n_val and total - n_test - n_train >= n_val)
  last = max(at + n_test, n_test + n_train + (n_val if spare else 0))  # the places any cut reads lie below it
  place_R = np.searchsorted(smallest_keys(keys_R, last), keys_R)  # past `last`: `last`, which no cut reads
  test_R = (place_R >= at) & (place_R < at + n_test)
  rest_R = np.where(place_R < at, place_R, place_R - n_test)  # the place among the other users
  train_R = ~test_R & ((rest_R < n_train) if n_train else True)
  val_R = ~test_R & spare & (rest_R >= n_train) & (rest_R < n_train + n_val)
  train = seqs.subset(order_R[train_R[order_R]])
  val = held_out_users(seqs, order_R[val_R[order_R]]) if spare else None
  return dataclasses.replace(train, split=train.offsets[1:].copy()), held_out_users(seqs, order_R[test_R[order_R]]), val


def held_out_users(seqs: UserSequences, idx: np.ndarray) -> UserSequences:
  """The users `idx` as new users: everything after each sequence's opening BOS is the target."""
  held = seqs.subset(idx)
  return dataclasses.replace(held, split=held.offsets[:-1] + 1)


def spare_users(
  num_users: int, n_train: int, n_test: int, n: int, seed: int, test_offset: int = -1, order: np.ndarray | None = None
) -> np.ndarray | None:
  """The n users after the training users in split_order's other users, when --train_users leaves that many."""
  rest, _ = split_order(num_users, n_train, n_test, seed, test_offset, order)
  if not n_train or len(rest) - n_train < n:
    return None
  return rest[n_train : n_train + n]


def outcome_types(table: pa.Table) -> list[str]:
  """Sorted distinct outcome event types (lower-cased) present in `table`."""
  if "event_type" not in table.column_names:
    return []
  kinds = pc.unique(_event_kinds(table["event_type"])).drop_null().to_pylist()
  return sorted(k for k in kinds if k not in VIEW_EVENTS)


def build_sequences(
  table: pa.Table,
  tokenizer: PageTokenizer,
  session_gap_s: float = 1800,
  holdout: str = "auto",
  fmt_hint: str | None = None,
  source: str | None = None,
  allow_empty: bool = False,
) -> tuple[UserSequences, dict]:
  """Sessionised, tokenised per-user sequences of `table` and counts for logging.

  `fmt_hint` and `source` (the name used in errors) default to what read_events recorded. `allow_empty`: a table
  without events or without a user long enough gives no users instead of an error (one process's share of a log;
  the job checks the total).
  """
  meta = table.schema.metadata or {}
  source = source or meta.get(b"hetlm_source", b"events").decode()
  fmt_hint = fmt_hint or meta.get(b"hetlm_format", b"").decode() or None
  if holdout not in HOLDOUTS:
    raise HetlmError(f"holdout must be one of {', '.join(HOLDOUTS)}, not {holdout!r}")
  if holdout == "auto":
    holdout = "last" if fmt_hint == "user_items" else "half"
  if b"hetlm_format" not in meta:  # read_events output is already normalised
    table = normalise_events(table, source)
  n_events = table.num_rows
  if n_events == 0 and allow_empty:
    return UserSequences.empty(), _stats(0, 0, 0, UserSequences.empty(), np.zeros(0, np.int64), 0, holdout)
  if n_events == 0:
    raise input_error(source, "no events (empty table)")

  user_E, user_ids = _user_ranks(table["user_id"])
  ts_E = table["timestamp"].to_numpy()
  page_E = tokenizer.encode_pages(table["page"])
  outcome_E = np.full(n_events, -1, np.int32)
  if "event_type" in table.column_names:
    kinds = _event_kinds(table["event_type"])
    is_view = pc.fill_null(pc.is_in(kinds, value_set=pa.array(VIEW_EVENTS)), False)
    is_outcome = pc.invert(pc.or_(is_view, pc.is_null(kinds)))
    is_outcome_E = is_outcome.to_numpy(zero_copy_only=False)
    outcome_E[is_outcome_E] = tokenizer.outcome_ids(kinds.filter(is_outcome))
  sess_E = table["session_id"].to_numpy() if "session_id" in table.column_names else None

  order = _event_order(user_E, ts_E, sess_E)
  if order is not None:
    user_E, ts_E, page_E, outcome_E = user_E[order], ts_E[order], page_E[order], outcome_E[order]
    sess_E = sess_E[order] if sess_E is not None else None

  new_E = np.ones(n_events, bool)
  new_E[1:] = user_E[1:] != user_E[:-1]
  if sess_E is not None:
    new_E[1:] |= sess_E[1:] != sess_E[:-1]
  else:
    new_E[1:] |= (ts_E[1:] - ts_E[:-1]) > session_gap_s

  users_in = len(user_ids)
  events_U = np.bincount(user_E, minlength=users_in)
  sessions_U = np.bincount(user_E[new_E], minlength=users_in)
  keep_U = (sessions_U >= 2) | (events_U >= (1 if holdout == "none" else 2))
  if not keep_U.any() and allow_empty:
    return UserSequences.empty(), _stats(n_events, 0, users_in, UserSequences.empty(), np.zeros(0), 0, holdout)
  if not keep_U.any():
    raise input_error(source, NO_USERS_LEFT)
  if not keep_U.all():
    keep_E = keep_U[user_E]
    user_E = (np.cumsum(keep_U) - 1)[user_E[keep_E]]
    page_E, outcome_E, new_E = page_E[keep_E], outcome_E[keep_E], new_E[keep_E]
    user_ids, sessions_U = user_ids[keep_U], sessions_U[keep_U]

  tokens, offsets, split = _layout(user_E, page_E, outcome_E, new_E, sessions_U, holdout)
  seqs = UserSequences(
    user_ids=user_ids, tokens=tokens, offsets=offsets, split=split, n_sessions=sessions_U.astype(np.int32)
  )
  return seqs, _stats(n_events, len(user_E), users_in, seqs, sessions_U, int((outcome_E >= 0).sum()), holdout)


NO_USERS_LEFT = "no users left: every user has one session with fewer than 2 events"


def _stats(events: int, kept: int, users_in: int, seqs: UserSequences, sessions_U, outcomes: int, holdout: str) -> dict:
  """build_sequences' counts for logging (every one but holdout adds up over the processes' shares)."""
  return {
    "events": events,
    "events_kept": kept,
    "users_in": users_in,
    "users_dropped_too_short": int(users_in - seqs.num_users),
    "users": seqs.num_users,
    "sessions": int(np.sum(sessions_U)),
    "outcome_events": outcomes,
    "tokens": seqs.num_tokens,
    "holdout": holdout,
  }


def window_bounds(seqs: UserSequences, part: str, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per user: first token index, length (≤ width) and first scored token of the window of `part`.

  'history': the most recent `width` history tokens, every predicted one scored (training, and
  assigning clusters). 'target': the last `width` tokens of history+target, but starting no later
  than the last history token so at least one target token is predicted (a target longer than that
  keeps its beginning); only target tokens are scored (held-out evaluation).
  """
  begin_U, split_U, end_U = seqs.offsets[:-1], seqs.split, seqs.offsets[1:]
  if part == "history":
    length_U = np.minimum(split_U - begin_U, width)
    start_U = split_U - length_U
    return start_U, length_U, start_U + 1
  if part == "target":
    start_U = np.minimum(np.maximum(begin_U, end_U - width), split_U - 1)
    return start_U, np.minimum(end_U - start_U, width), split_U
  raise ValueError(f"part must be 'history' or 'target', not {part!r}")


def all_windows(seqs: UserSequences, part: str, width: int) -> tuple[np.ndarray, ...]:
  """Windows that together score every token of `part`: (owner_W, start_W, length_W, scored_W).

  'history': the window of `window_bounds` plus, for a longer history, earlier windows of `width`
  tokens, each overlapping the next by one token, so every history token but the first is predicted
  once (training uses them all). 'target': the window of `window_bounds` plus, for a target that
  overflows it, windows ending every width/2 tokens, each scoring only its last width/2 tokens
  with at least width/2 tokens of context.
  """
  start_U, length_U, scored_U = window_bounds(seqs, part, width)
  if part == "history":
    step = width - 1
    extra_U = np.maximum(start_U - seqs.offsets[:-1], 0)
    n_U = -(-extra_U // step)
    owner_W, j_W = _expand(n_U)
    end_W = start_U[owner_W] + 1 - (j_W - 1) * step  # each ends one token after the next one starts
    first_W = np.maximum(end_W - width, seqs.offsets[:-1][owner_W])
    extra = (first_W, end_W - first_W, first_W + 1)
  else:
    stride = max(width // 2, 1)
    first_end_U = start_U + length_U
    n_U = -(-(seqs.offsets[1:] - first_end_U) // stride)
    owner_W, j_W = _expand(n_U)
    scored_W = first_end_U[owner_W] + (j_W - 1) * stride
    end_W = np.minimum(scored_W + stride, seqs.offsets[1:][owner_W])
    extra = (end_W - width, np.full(len(owner_W), width), scored_W)
  owner = np.concatenate([np.arange(seqs.num_users), owner_W])
  order = np.argsort(owner, kind="stable")
  return (owner[order],) + tuple(
    np.concatenate([a, b]).astype(np.int64)[order] for a, b in zip((start_U, length_U, scored_U), extra)
  )


def _expand(n_U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(owner_W, j_W): user u repeated n_U[u] times, with j = 1..n_U[u]."""
  owner_W = np.repeat(np.arange(len(n_U)), n_U)
  return owner_W, np.arange(len(owner_W)) - np.repeat(np.cumsum(n_U) - n_U, n_U) + 1


def _windows(seqs: UserSequences, user_idx_B: np.ndarray, part: str, context: int):
  user_B = np.asarray(user_idx_B, np.int64)
  u_B = np.where(user_B >= 0, user_B, 0)
  start_U, length_U, scored_U = window_bounds(seqs, part, context + 1)
  len_B = np.where(user_B >= 0, length_U[u_B], 0)
  inputs_BxT1, valid_BxT1 = _gather(seqs.tokens, start_U[u_B], len_B, context + 1)
  pos_BxT = start_U[u_B][:, None] + np.arange(1, context + 1)[None, :]
  return inputs_BxT1, valid_BxT1, valid_BxT1[:, 1:] & (pos_BxT >= scored_U[u_B][:, None])


def history_windows(seqs: UserSequences, user_idx_B: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, context+1] windows of the most recent history tokens, right-padded with PAD.

  Returns (inputs_BxT1 int32, valid_BxT1 bool); user index -1 gives an empty row.
  """
  inputs_BxT1, valid_BxT1, _ = _windows(seqs, user_idx_B, "history", context)
  return inputs_BxT1, valid_BxT1


def target_windows(seqs: UserSequences, user_idx_B: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, context+1] windows ending the user's history+target (see `window_bounds`), and which
  predictions are scored: loss_mask_BxT[b, t] iff token t+1 is a target token. User -1: empty row."""
  inputs_BxT1, _, loss_mask_BxT = _windows(seqs, user_idx_B, "target", context)
  return inputs_BxT1, loss_mask_BxT


# ---------------------------------------------------------------------------------------------


def _event_kinds(event_type: pa.ChunkedArray) -> pa.ChunkedArray:
  return pc.utf8_lower(pc.utf8_trim_whitespace(event_type))


def id_order(ids: pa.Array) -> np.ndarray:
  """The order of distinct user ids: numerically when every id is a decimal integer, else by string."""
  keys = pa.table({"id": ids})
  sort_keys = [("id", "ascending")]
  if pc.all(pc.match_substring_regex(ids, r"^[0-9]{1,18}$")).as_py():
    keys = keys.append_column("num", pc.cast(ids, pa.int64()))
    sort_keys.insert(0, ("num", "ascending"))
  return pc.sort_indices(keys, sort_keys=sort_keys).to_numpy()


def _user_ranks(user_id: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
  """Per-event user index in id order, and the ids ([U] object array) in that order."""
  # As large_string: one chunk of 32-bit string offsets overflows past 2 GiB of ids (~200M events of 10 characters).
  enc = pc.dictionary_encode(user_id.cast(pa.large_string()).combine_chunks())
  ids = enc.dictionary
  order_U = id_order(ids)
  rank_of_code = np.empty(len(ids), np.int64)
  rank_of_code[order_U] = np.arange(len(ids))
  user_E = rank_of_code[enc.indices.to_numpy()]
  return user_E, ids.take(pa.array(order_U)).to_numpy(zero_copy_only=False)


def _is_sorted(*keys: np.ndarray) -> bool:
  """Whether rows are already in lexicographic order of `keys` (most significant first)."""
  ok = np.ones(max(len(keys[0]) - 1, 0), bool)
  for key in reversed(keys):
    ok = (key[1:] > key[:-1]) | ((key[1:] == key[:-1]) & ok)
  return bool(ok.all())


def _stable_order(*keys: np.ndarray) -> np.ndarray:
  """Stable lexicographic argsort by `keys` (most significant first).

  Keys are packed into as few int64 keys as fit, then sorted least significant first; this
  is several times faster than np.lexsort on millions of rows.
  """
  packed, spans = [], []
  for key in keys:
    lo, hi = int(key.min()), int(key.max())
    span = hi - lo + 1
    if span >= 2**62:  # shifting could overflow; sort this key on its own
      packed.append(key)
      spans.append(2**63)
      continue
    key = key.astype(np.int64) - lo
    if packed and spans[-1] * span < 2**62:
      packed[-1], spans[-1] = packed[-1] * span + key, spans[-1] * span
    else:
      packed.append(key)
      spans.append(span)
  order = np.argsort(packed[-1], kind="stable")
  for key in reversed(packed[:-1]):
    order = order[np.argsort(key[order], kind="stable")]
  return order


def _event_order(user_E: np.ndarray, ts_E: np.ndarray, sess_E: np.ndarray | None) -> np.ndarray | None:
  """Stable order of events by user, session (by its first timestamp) and time; None if sorted."""
  if sess_E is None:
    return None if _is_sorted(user_E, ts_E) else _stable_order(user_E, ts_E)
  # Sorted by (user, time) with each session a contiguous run of rising codes is already final.
  if _is_sorted(user_E, ts_E) and _is_sorted(user_E, sess_E, ts_E):
    return None
  by_session = _stable_order(user_E, sess_E, ts_E)
  u, s = user_E[by_session], sess_E[by_session]
  first = np.ones(len(u), bool)
  first[1:] = (u[1:] != u[:-1]) | (s[1:] != s[:-1])
  session_start_E = np.empty_like(ts_E)
  session_start_E[by_session] = ts_E[by_session][first][np.cumsum(first) - 1]
  return _stable_order(user_E, session_start_E, sess_E, ts_E)


def _layout(
  user_E: np.ndarray, page_E: np.ndarray, outcome_E: np.ndarray, new_E: np.ndarray, sessions_U: np.ndarray, holdout: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flat tokens, offsets and split of events sorted by user, session and time."""
  n = len(user_E)
  emit_E = 1 + (outcome_E >= 0).astype(np.int64)
  session_E = np.cumsum(new_E) - 1
  # Only sessions of multi-session users end in EOS: a single-session user's end is never seen in
  # training (it lies in the held-out suffix), so it is not asked for there either.
  eos_G = (sessions_U[user_E[new_E]] >= 2) | (holdout == "none")
  eos_before_G = np.cumsum(eos_G) - eos_G
  # Tokens before an event: earlier events' tokens, earlier sessions' BOS and EOS, its own BOS.
  pos_E = np.cumsum(emit_E) - emit_E + session_E + eos_before_G[session_E] + 1
  total = int(emit_E.sum()) + len(eos_G) + int(eos_G.sum())
  tokens = np.empty(total, np.int32)
  tokens[pos_E] = page_E
  has_outcome = outcome_E >= 0
  tokens[pos_E[has_outcome] + 1] = outcome_E[has_outcome]
  bos_G = pos_E[new_E] - 1
  tokens[bos_G] = BOS
  tokens[(np.append(bos_G[1:], total) - 1)[eos_G]] = EOS

  first_U = np.flatnonzero(np.append(True, user_E[1:] != user_E[:-1]))
  offsets = np.append(bos_G[session_E[first_U]], total).astype(np.int64)
  split = bos_G[np.cumsum(sessions_U) - 1].astype(np.int64)  # last session's BOS
  start_U, end_U = offsets[:-1], offsets[1:]
  if holdout == "none":
    return tokens, offsets, end_U.copy()
  if holdout == "half":
    n_U = end_U - start_U - 1
    single_split = start_U + 1 + n_U - n_U // 2
  else:
    last_U = np.append(first_U[1:], n) - 1
    single_split = end_U - emit_E[last_U]
  split = np.where(sessions_U == 1, single_split, split)
  return tokens, offsets, split


def _gather(tokens: np.ndarray, start_B: np.ndarray, len_B: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows tokens[start:start+len], right-padded with PAD to `width`."""
  valid_BxT1 = np.arange(width)[None, :] < len_B[:, None]
  if tokens.size == 0:
    return np.full(valid_BxT1.shape, PAD, np.int32), valid_BxT1
  idx_BxT1 = np.clip(start_B[:, None] + np.arange(width)[None, :], 0, tokens.size - 1)
  return np.where(valid_BxT1, tokens[idx_BxT1], PAD).astype(np.int32), valid_BxT1
