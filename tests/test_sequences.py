"""build_sequences: sorting, sessions, outcome tokens, the temporal split and the windows."""

import numpy as np
import pyarrow as pa
import pytest

from hetlm_jax.data.sequences import UserSequences, build_sequences, history_windows, outcome_types, target_windows
from hetlm_jax.data.tokenizer import BOS, EOS, PAD, PageTokenizer
from hetlm_jax.errors import HetlmError

H = 3600


def events(rows, **extra):
  """Table from (user, timestamp, page[, event_type]) tuples."""
  cols = list(zip(*rows))
  table = {"user_id": list(cols[0]), "timestamp": list(cols[1]), "page": list(cols[2])}
  if len(cols) > 3:
    table["event_type"] = list(cols[3])
  table.update(extra)
  return pa.table(table)


def build(table, **kw):
  tok = PageTokenizer.fit(table["page"], outcome_types(table))
  seqs, stats = build_sequences(table, tok, **kw)
  return seqs, stats, tok


def decoded(seqs, tok):
  """{user: (history, target)} as token strings."""
  return {u: (tok.decode(seqs.history(i)), tok.decode(seqs.target(i))) for i, u in enumerate(seqs.user_ids)}


def test_shuffled_rows_give_the_same_sequences():
  rng = np.random.default_rng(0)
  n = 400
  user = rng.integers(0, 30, n)
  ts = rng.permutation(10**6)[:n] * 7  # distinct, gaps often above 30 min
  table = pa.table(
    {
      "user_id": [f"u{x}" for x in user],
      "timestamp": ts,
      "page": [f"p{x}" for x in rng.integers(0, 20, n)],
      "event_type": rng.choice(["view", "cart", None, "order"], n).tolist(),
    }
  )
  a, stats_a, tok = build(table)
  b, stats_b = build_sequences(table.take(rng.permutation(n)), tok)
  assert stats_a == stats_b
  for field in ("user_ids", "tokens", "offsets", "split", "n_sessions"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert a.n_sessions.max() > 1


def test_gap_above_30_minutes_starts_a_new_session():
  table = events([("u", 0, "a"), ("u", 1800, "b"), ("u", 3601, "c"), ("u", 3700, "d")])
  seqs, stats, tok = build(table)
  assert seqs.n_sessions.tolist() == [2] and stats["sessions"] == 2
  assert decoded(seqs, tok) == {"u": (["<s>", "a", "b", "</s>"], ["<s>", "c", "d", "</s>"])}
  seqs, _, tok = build(table, session_gap_s=2 * H)
  assert seqs.n_sessions.tolist() == [1]


def test_session_id_column_decides_sessions():
  # Same session despite a long gap; new session despite a short one; interleaved sessions
  # are grouped and ordered by their first event.
  table = events(
    [("u", 0, "a"), ("u", 10 * H, "b"), ("u", 10 * H + 1, "c"), ("u", 5, "x")], session_id=["s1", "s1", "s2", "s9"]
  )
  seqs, _, tok = build(table)
  assert seqs.n_sessions.tolist() == [3]
  hist, target = decoded(seqs, tok)["u"]
  assert hist == ["<s>", "a", "b", "</s>", "<s>", "x", "</s>"]
  assert target == ["<s>", "c", "</s>"]


def test_outcome_token_follows_its_page():
  table = events(
    [("u", 0, "a", "view"), ("u", 1, "b", "Cart"), ("u", 2, "c", None), ("u", 3, "d", "CLICK"), ("u", 4, "e", "orders")]
  )
  seqs, stats, tok = build(table, holdout="last")
  assert tok.outcome_types == ["cart", "orders"]
  assert stats["outcome_events"] == 2
  hist, target = decoded(seqs, tok)["u"]
  assert hist == ["<s>", "a", "b", "<cart>", "c", "d"]
  assert target == ["e", "<orders>"]


def test_multi_session_user_holds_out_the_last_session():
  table = events([("u", 0, "a"), ("u", 1, "b"), ("u", 5 * H, "c"), ("u", 10 * H, "d"), ("u", 10 * H + 60, "e")])
  seqs, _, tok = build(table)
  assert decoded(seqs, tok)["u"] == (["<s>", "a", "b", "</s>", "<s>", "c", "</s>"], ["<s>", "d", "e", "</s>"])
  assert seqs.split[0] == seqs.offsets[0] + 7


@pytest.mark.parametrize("n_events, n_history", [(2, 1), (3, 2), (4, 2), (5, 3)])
def test_single_session_half_split_without_end_marker(n_events, n_history):
  table = events([("u", t, f"p{t}") for t in range(n_events)])
  seqs, _, tok = build(table, holdout="half")
  hist, target = decoded(seqs, tok)["u"]
  pages = [f"p{t}" for t in range(n_events)]
  assert hist == ["<s>"] + pages[:n_history]
  assert target == pages[n_history:]


def test_auto_holdout_is_last_for_user_items_else_half():
  table = events([("u", t, f"p{t}") for t in range(4)])
  seqs, stats, tok = build(table, fmt_hint="user_items")
  assert stats["holdout"] == "last" and decoded(seqs, tok)["u"][1] == ["p3"]
  seqs, stats, tok = build(table)
  assert stats["holdout"] == "half" and decoded(seqs, tok)["u"][1] == ["p2", "p3"]
  with pytest.raises(HetlmError, match="holdout"):
    build(table, holdout="first")


def test_too_short_users_are_dropped_and_counted():
  table = events([("one", 0, "a"), ("two", 0, "a"), ("two", 1, "b"), ("split", 0, "a"), ("split", 5 * H, "b")])
  seqs, stats, _ = build(table)
  assert sorted(seqs.user_ids.tolist()) == ["split", "two"]
  assert stats["users_in"] == 3 and stats["users_dropped_too_short"] == 1 and stats["users"] == 2
  assert stats["events"] == 5 and stats["events_kept"] == 4
  with pytest.raises(HetlmError, match="no users left"):
    build(events([("one", 0, "a"), ("other", 0, "b")]))


def test_users_ordered_numerically_and_flat_layout_is_consistent():
  table = events([("10", 0, "a"), ("10", 1, "b"), ("9", 0, "c"), ("9", 1, "a"), ("9", 2, "a")])
  seqs, stats, tok = build(table)
  assert seqs.user_ids.tolist() == ["9", "10"]
  assert seqs.offsets.tolist() == [0, 4, 7] and stats["tokens"] == 7
  assert seqs.tokens.dtype == np.int32 and seqs.offsets.dtype == np.int64
  assert tok.decode(seqs.tokens) == ["<s>", "c", "a", "a", "<s>", "a", "b"]


def test_only_multi_session_users_have_end_markers():
  table = events([("multi", 0, "a"), ("multi", 5 * H, "b"), ("single", 0, "c"), ("single", 1, "d")])
  seqs, _, tok = build(table)
  assert decoded(seqs, tok) == {"multi": (["<s>", "a", "</s>"], ["<s>", "b", "</s>"]), "single": (["<s>", "c"], ["d"])}


def test_subset_gathers_users():
  table = events([(u, t, f"p{(t * 7 + len(u)) % 5}") for u in ["a", "bb", "ccc"] for t in range(2 + len(u))])
  seqs, _, _ = build(table)
  sub = seqs.subset(np.array([2, 0]))
  assert sub.user_ids.tolist() == ["ccc", "a"]
  for new, old in [(0, 2), (1, 0)]:
    np.testing.assert_array_equal(sub.history(new), seqs.history(old))
    np.testing.assert_array_equal(sub.target(new), seqs.target(old))
  assert sub.subset(np.array([True, False])).user_ids.tolist() == ["ccc"]


def toy_sequences():
  """Two users with hand-made tokens: history/target lengths (6, 3) and (2, 5)."""
  tokens = np.array([BOS, 10, 11, 12, 13, 14, 15, 16, EOS, BOS, 20, 21, 22, 23, 24, EOS], np.int32)
  return UserSequences(
    user_ids=np.array(["a", "b"], object),
    tokens=tokens,
    offsets=np.array([0, 9, 16]),
    split=np.array([6, 11]),
    n_sessions=np.array([1, 1], np.int32),
  )


def test_history_windows_cut_left_and_pad_right():
  seqs = toy_sequences()
  inputs, valid = history_windows(seqs, np.array([0, 1, -1]), context=3)
  assert inputs.dtype == np.int32 and inputs.shape == (3, 4)
  assert inputs.tolist() == [[11, 12, 13, 14], [BOS, 20, PAD, PAD], [PAD] * 4]
  assert valid.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]


def test_target_windows_mask_exactly_the_target_tokens():
  seqs = toy_sequences()
  inputs, loss = target_windows(seqs, np.array([0, -1]), context=5)
  assert inputs.tolist() == [[12, 13, 14, 15, 16, EOS], [PAD] * 6]
  assert loss.shape == (2, 5)
  assert loss.tolist() == [[False, False, True, True, True], [False] * 5]
  # Short user: whole sequence fits, padded on the right; the mask covers the 5 target tokens.
  inputs, loss = target_windows(seqs, np.array([1]), context=8)
  assert inputs.tolist() == [[BOS, 20, 21, 22, 23, 24, EOS, PAD, PAD]]
  assert loss.tolist() == [[False, True, True, True, True, True, False, False]]
  # Target longer than the context: last history token, then the start of the target.
  inputs, loss = target_windows(seqs, np.array([1]), context=3)
  assert inputs.tolist() == [[20, 21, 22, 23]]
  assert loss.tolist() == [[True, True, True]]


def test_windows_of_built_sequences_match_history_and_target():
  table = events([("u", t * 10, f"p{t % 4}") for t in range(9)])
  seqs, _, _ = build(table)
  hist, target = seqs.history(0), seqs.target(0)
  inputs, loss = target_windows(seqs, np.array([0]), context=32)
  n = len(hist) + len(target)
  np.testing.assert_array_equal(inputs[0, :n], np.concatenate([hist, target]))
  np.testing.assert_array_equal(inputs[0, 1:][loss[0]], target)


def test_unnormalised_or_empty_tables_are_input_errors():
  table = events([("u", 0, "a"), ("u", 1, "b")])
  tok = PageTokenizer.fit(table["page"])
  with pytest.raises(HetlmError, match="^events: column 'timestamp' holds non-numeric"):
    build_sequences(table.set_column(1, "timestamp", pa.array(["x", "y"])), tok)
  with pytest.raises(HetlmError, match="^my.csv: no events"):
    build_sequences(table.slice(0, 0), tok, source="my.csv")
