"""Synthetic browsing logs: users drawn from a few distinct Markov page-behaviours."""

import numpy as np
import pyarrow as pa


def markov_events(n_users=240, n_groups=3, n_pages=12, sessions=3, session_len=8, seed=0):
  """Events table (user_id, timestamp, page) and each user's true group.

  Every group has its own peaked transition matrix over the same pages, so a user's pages say which
  group they belong to. Sessions are 2 hours apart, pages 1 minute apart.
  """
  rng = np.random.default_rng(seed)
  # Each page has one strongly preferred successor, different in every group.
  transitions = np.full((n_groups, n_pages, n_pages), 0.1 / (n_pages - 1))
  for g in range(n_groups):
    transitions[g, np.arange(n_pages), rng.permutation(n_pages)] = 0.9
    transitions[g] /= transitions[g].sum(axis=1, keepdims=True)
  group_U = np.arange(n_users) % n_groups
  n_steps = sessions * session_len
  pages_UxS = np.zeros((n_users, n_steps), np.int64)
  pages_UxS[:, 0] = rng.integers(0, n_pages, n_users)
  cum = transitions.cumsum(axis=2)
  for s in range(1, n_steps):
    restart = s % session_len == 0
    if restart:
      pages_UxS[:, s] = rng.integers(0, n_pages, n_users)
      continue
    rows = cum[group_U, pages_UxS[:, s - 1]]
    pages_UxS[:, s] = np.minimum((rows < rng.random((n_users, 1))).sum(axis=1), n_pages - 1)
  step = np.arange(n_steps)
  ts_S = (step // session_len) * 7200 + (step % session_len) * 60
  table = pa.table(
    {
      "user_id": np.repeat(np.array([f"u{u:04d}" for u in range(n_users)]), n_steps),
      "timestamp": np.tile(ts_S, n_users).astype(np.int64) + 1_600_000_000,
      "page": np.array([f"/p/{p}" for p in range(n_pages)])[pages_UxS.reshape(-1)],
    }
  )
  return table, group_U
