"""Generated sessions that look real: a length from the data when training never ends a session, and the
repetition rate that measures degenerate generation."""

import numpy as np

from hetlm_jax.data.sequences import UserSequences, session_length_from_data
from hetlm_jax.data.tokenizer import BOS, EOS
from hetlm_jax.eval.metrics import max_repeats, repetition_rate


def _seqs(users):
  """users: (history, target) token lists."""
  tokens, offsets, split = [], [0], []
  for history, target in users:
    split.append(offsets[-1] + len(history))
    tokens += history + target
    offsets.append(len(tokens))
  return UserSequences(
    user_ids=np.array([f"u{i}" for i in range(len(users))]),
    tokens=np.array(tokens, np.int32),
    offsets=np.array(offsets, np.int64),
    split=np.array(split, np.int64),
    n_sessions=np.ones(len(users), np.int64),
  )


def test_a_session_length_comes_from_the_data_only_when_training_never_ends_a_session():
  p = lambda *pages: [10 + x for x in pages]
  no_ends = _seqs(
    [
      ([BOS, *p(1, 2, 3)], p(4, 5)),
      ([BOS, *p(1)], p(2)),
      ([BOS, *p(1, 2, 3, 4, 5)], p(6)),
      ([BOS, *p(1, 2), BOS, *p(3, 4, 5)], p(1)),
    ]
  )
  # History sessions hold 3, 1, 5, 2 and 3 pages: the median is 3.
  assert session_length_from_data(no_ends, num_specials=10) == 3
  with_ends = _seqs([([BOS, *p(1, 2), EOS, BOS, *p(3)], p(4))])
  assert session_length_from_data(with_ends, num_specials=10) is None


def test_repetition_rate_counts_sessions_that_repeat_a_page_more_than_real_ones_do():
  real = [np.array([1, 2, 3]), np.array([1, 1, 2]), np.array([4])] * 40  # at most 2 repeats
  assert max_repeats([np.array([5, 5, 5, 2]), np.array([], np.int64)]).tolist() == [3, 0]
  generated = [np.array([7] * 20), np.array([1, 2]), np.array([3, 3]), np.array([9, 9, 9])]
  assert repetition_rate(generated, real) == 0.5  # the 20 x "7" and the three 9s
  assert repetition_rate(real, real) == 0.0
