"""Held-out metrics: next-page ranking, per-user summaries and paired bootstrap, sessions, outcomes.

Per-user metric arrays hold NaN for users a metric does not apply to, so nan-aware reductions
(and `summarize`) skip them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from scipy.special import logsumexp
from sklearn.metrics import f1_score, roc_auc_score

from hetlm_jax.data.ownership import key_streams, uniform, user_keys
from hetlm_jax.data.sequences import UserSequences

_CHUNK = 1 << 22  # entries of a temporary rows×columns array (bootstrap, exact negatives) at once


# --------------------------------------------------------------------------------------------
# Ranking of the true next token


def _from_ranks(rank_U: np.ndarray, valid_U: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
  """hr@k, ndcg@k for every k, and mrr from 1-based ranks; NaN where not valid."""
  rank_U = np.where(valid_U, rank_U, np.nan).astype(np.float64)
  out = {"valid": valid_U, "rank": rank_U}
  with np.errstate(invalid="ignore"):
    for k in ks:
      hit_U = rank_U <= k
      out[f"hr@{k}"] = np.where(valid_U, hit_U, np.nan)
      # One relevant item, so the ideal DCG is 1.
      out[f"ndcg@{k}"] = np.where(valid_U, np.where(hit_U, 1.0 / np.log2(rank_U + 1), 0.0), np.nan)
    out["mrr"] = 1.0 / rank_U
  return out


def _last_where_unknown(
  ahead_U: np.ndarray, valid_U: np.ndarray, true_U: np.ndarray, unknown: int | None, behind: int
) -> tuple[np.ndarray, np.ndarray]:
  """A true token that is `unknown` (a page the models never saw) ranks behind all `behind` others: a miss."""
  if unknown is None:
    return ahead_U, valid_U
  unknown_U = true_U == unknown
  return np.where(unknown_U, behind, ahead_U), valid_U | unknown_U


def ranking_metrics(
  logp_UxV: np.ndarray,
  true_U: np.ndarray,
  candidate_V: np.ndarray,
  ks: Sequence[int] = (1, 5, 10),
  unknown: int | None = None,
) -> dict[str, np.ndarray]:
  """Rank of each user's true token among all candidate tokens (e.g. pages), ties pessimistic.

  Returns per-user "hr@k", "ndcg@k" (for every k in ks), "mrr", "rank" and the boolean "valid":
  users whose true token is not a candidate (e.g. EOS) are excluded and get NaN, except that a true
  token equal to `unknown` (UNK: a real page no model can name) counts as a miss, ranked last.
  """
  logp_UxV = np.asarray(logp_UxV)
  true_U = np.asarray(true_U, np.int64)
  candidate_V = np.asarray(candidate_V, bool)
  valid_U = candidate_V[true_U]
  score_U = logp_UxV[np.arange(len(true_U)), true_U]
  # The true token itself is among the counted ones when it is a candidate.
  ahead_U = ((logp_UxV >= score_U[:, None]) & candidate_V).sum(axis=1) - valid_U
  ahead_U, valid_U = _last_where_unknown(ahead_U, valid_U, true_U, unknown, int(candidate_V.sum()))
  return _from_ranks(ahead_U + 1, valid_U, ks)


def sample_negatives(
  seqs: UserSequences,
  candidate_V: np.ndarray,
  n_negatives: int = 100,
  seed: int = 0,
  exclude_U: np.ndarray | None = None,
  max_rounds: int = 32,
  by_id: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """[U, n] negatives per user, uniform without replacement over candidates the user never had.

  Never in the user's history or target (nor `exclude_U[u]`). Returns (negatives_UxQ int64,
  ok_U bool); users with fewer than n eligible candidates get ok=False and a row of -1. `by_id`: each user's draws
  come from a seeded hash of its id (`ownership.key_streams`), so they do not depend on the other users (--split=hash,
  --own_users); else from one numpy generator over the users in order.
  """
  candidate_V = np.asarray(candidate_V, bool)
  v, u = len(candidate_V), seqs.num_users
  cand_C = np.flatnonzero(candidate_V)
  c = len(cand_C)
  user_N = np.repeat(np.arange(u, dtype=np.int64), seqs.lengths)
  seen_keys = [user_N * v + seqs.tokens]
  if exclude_U is not None:
    seen_keys.append(np.arange(u, dtype=np.int64) * v + np.asarray(exclude_U, np.int64))
  seen_P = np.unique(np.concatenate(seen_keys))
  seen_P = seen_P[candidate_V[seen_P % v]]
  ok_U = c - np.bincount(seen_P // v, minlength=u) >= n_negatives
  neg_UxQ = np.full((u, n_negatives), -1, np.int64)
  if c == 0 or n_negatives == 0 or not ok_U.any():
    return neg_UxQ, ok_U

  rng = np.random.default_rng(seed)
  rows_R = np.flatnonzero(ok_U)
  keys_R = user_keys(pa.array(seqs.user_ids[rows_R].astype(str), pa.large_string()), seed, 31) if by_id else None
  if by_id:
    draw_RxQ = cand_C[key_streams(keys_R, n_negatives) % np.uint64(c)]
  else:
    draw_RxQ = cand_C[rng.integers(0, c, (len(rows_R), n_negatives))]

  def bad(draw_RxQ: np.ndarray) -> np.ndarray:
    key_RxQ = rows_R[:, None] * v + draw_RxQ
    idx_RxQ = np.minimum(np.searchsorted(seen_P, key_RxQ), len(seen_P) - 1)
    seen_RxQ = seen_P[idx_RxQ] == key_RxQ if len(seen_P) else np.zeros(key_RxQ.shape, bool)
    # Repeats within a row: every occurrence after the first is redrawn.
    order_RxQ = np.argsort(draw_RxQ, axis=1, kind="stable")
    sorted_RxQ = np.take_along_axis(draw_RxQ, order_RxQ, axis=1)
    dup_sorted_RxQ = np.zeros_like(seen_RxQ)
    dup_sorted_RxQ[:, 1:] = sorted_RxQ[:, 1:] == sorted_RxQ[:, :-1]
    dup_RxQ = np.empty_like(seen_RxQ)
    np.put_along_axis(dup_RxQ, order_RxQ, dup_sorted_RxQ, axis=1)
    return seen_RxQ | dup_RxQ

  # Redrawing only the offending entries never looks at item labels, so each row stays a uniform
  # random subset of its eligible candidates.
  bad_RxQ = bad(draw_RxQ)
  for r in range(max_rounds):
    if not bad_RxQ.any():
      break
    if by_id:  # every user's own next draws, of which the bad entries take theirs
      draw_RxQ[bad_RxQ] = cand_C[(key_streams(keys_R, n_negatives, r + 1) % np.uint64(c))[bad_RxQ]]
    else:
      draw_RxQ[bad_RxQ] = cand_C[rng.integers(0, c, int(bad_RxQ.sum()))]
    bad_RxQ = bad(draw_RxQ)
  stuck_R = np.flatnonzero(bad_RxQ.any(axis=1))
  if len(stuck_R):  # rows with few eligible items: exact draw by random keys over all candidates
    if by_id:  # rows_R is sorted: a user's key is at its place in it
      draws = lambda users, n: uniform(key_streams(keys_R[np.searchsorted(rows_R, users)], n, max_rounds + 1))
    else:
      draws = lambda users, n: rng.random((len(users), n))
    draw_RxQ[stuck_R] = _exact_negatives(rows_R[stuck_R], seen_P, cand_C, v, n_negatives, draws)
  neg_UxQ[rows_R] = draw_RxQ
  return neg_UxQ, ok_U


def _exact_negatives(users_R: np.ndarray, seen_P: np.ndarray, cand_C: np.ndarray, v: int, n: int, draws) -> np.ndarray:
  """Per user (ascending ids), the candidates with the n smallest uniform keys (`draws(users, C)`: [len(users), C]
  floats in [0, 1)), seen ones barred."""
  cand_index_V = np.full(v, -1, np.int64)
  cand_index_V[cand_C] = np.arange(len(cand_C))
  out_RxQ = np.empty((len(users_R), n), np.int64)
  chunk = max(1, _CHUNK // len(cand_C))
  seen_user_P, seen_item_P = seen_P // v, seen_P % v
  for lo in range(0, len(users_R), chunk):
    users = users_R[lo : lo + chunk]
    keys_RxC = draws(users, len(cand_C))
    mine_P = np.isin(seen_user_P, users)
    row_P = np.searchsorted(users, seen_user_P[mine_P])  # users_R is sorted
    keys_RxC[row_P, cand_index_V[seen_item_P[mine_P]]] = np.inf
    out_RxQ[lo : lo + chunk] = cand_C[np.argpartition(keys_RxC, n - 1, axis=1)[:, :n]]
  return out_RxQ


def sampled_ranking_metrics(
  logp_UxV: np.ndarray,
  true_U: np.ndarray,
  seqs: UserSequences,
  candidate_V: np.ndarray,
  n_negatives: int = 100,
  seed: int = 0,
  ks: Sequence[int] = (1, 5, 10),
  unknown: int | None = None,
) -> dict[str, np.ndarray]:
  """SASRec's protocol: rank the true token against n negatives from `sample_negatives`, ties pessimistic.

  Same keys as `ranking_metrics`; a user is also invalid when fewer than n negatives exist.
  """
  neg_UxQ, ok_U = sample_negatives(seqs, candidate_V, n_negatives, seed, exclude_U=np.asarray(true_U, np.int64))
  return negatives_ranking_metrics(logp_UxV, true_U, neg_UxQ, ok_U, candidate_V, ks, unknown)


def negatives_ranking_metrics(
  logp_UxV: np.ndarray,
  true_U: np.ndarray,
  neg_UxQ: np.ndarray,
  ok_U: np.ndarray,
  candidate_V: np.ndarray,
  ks: Sequence[int] = (1, 5, 10),
  unknown: int | None = None,
) -> dict[str, np.ndarray]:
  """Rank of the true token against given negatives (rows of `sample_negatives`), ties pessimistic.

  Drawn once for all users, the same negatives serve every model, so their metrics are paired. A true
  token equal to `unknown` ranks behind every negative (a miss), as in `ranking_metrics`.
  """
  logp_UxV = np.asarray(logp_UxV)
  true_U = np.asarray(true_U, np.int64)
  candidate_V = np.asarray(candidate_V, bool)
  valid_U = candidate_V[true_U]
  score_U = logp_UxV[np.arange(len(true_U)), true_U]
  neg_score_UxQ = np.take_along_axis(logp_UxV, np.maximum(neg_UxQ, 0), axis=1)
  ahead_U = (neg_score_UxQ >= score_U[:, None]).sum(axis=1)
  ahead_U, valid_U = _last_where_unknown(ahead_U, valid_U, true_U, unknown, neg_UxQ.shape[1])
  return _from_ranks(ahead_U + 1, valid_U & ok_U, ks)


# --------------------------------------------------------------------------------------------
# Per-user summaries and paired comparison


def catalogue_nll(logp_UxV: np.ndarray, true_U: np.ndarray, candidate_V: np.ndarray) -> np.ndarray:
  """[U] the catalogue-renormalised NLL: -log of the true page's probability among the candidates (e.g. every page),
  logsumexp over them minus log p(true); NaN where the true token is not a candidate (UNK, a session end)."""
  logp_UxV, true_U = np.asarray(logp_UxV, np.float64), np.asarray(true_U, np.int64)
  candidate_V = np.asarray(candidate_V, bool)
  out = logsumexp(logp_UxV[:, candidate_V], axis=1) - logp_UxV[np.arange(len(true_U)), true_U]
  return np.where(candidate_V[true_U], out, np.nan)


def summarize(values_U: np.ndarray) -> dict[str, float]:
  """Mean, variance (ddof=0), std and 10/50/90th percentiles, ignoring NaN."""
  x = np.asarray(values_U, np.float64)
  with warnings.catch_warnings():  # all-NaN or empty input gives NaN, silently
    warnings.simplefilter("ignore", RuntimeWarning)
    p10, p50, p90 = np.nanpercentile(x, [10, 50, 90]) if x.size else (np.nan,) * 3
    return {
      "mean": float(np.nanmean(x)),
      "var": float(np.nanvar(x)),
      "std": float(np.nanstd(x)),
      "p10": float(p10),
      "p50": float(p50),
      "p90": float(p90),
    }


def paired_bootstrap(a_U: np.ndarray, b_U: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
  """Percentile CIs for mean(a) − mean(b) and var(a) − var(b), resampling users jointly.

  var is the across-user variance (ddof=0), so var_diff compares how heterogeneous the two are.
  Users with NaN in a or b are dropped.
  """
  a_U, b_U = np.asarray(a_U, np.float64), np.asarray(b_U, np.float64)
  if a_U.shape != b_U.shape:
    raise ValueError("a and b must hold the same users")
  keep_U = ~(np.isnan(a_U) | np.isnan(b_U))
  a_U, b_U = a_U[keep_U], b_U[keep_U]
  u = len(a_U)
  if u == 0:
    return {"mean_diff": np.nan, "mean_ci": [np.nan, np.nan], "var_diff": np.nan, "var_ci": [np.nan, np.nan]}
  rng = np.random.default_rng(seed)
  diff_U = a_U - b_U
  mean_Z, var_Z = np.empty(n_boot), np.empty(n_boot)
  chunk = max(1, _CHUNK // u)
  for lo in range(0, n_boot, chunk):
    idx_ZxU = rng.integers(0, u, (min(chunk, n_boot - lo), u))
    mean_Z[lo : lo + chunk] = diff_U[idx_ZxU].mean(axis=1)
    var_Z[lo : lo + chunk] = a_U[idx_ZxU].var(axis=1) - b_U[idx_ZxU].var(axis=1)
  q = [(1 - level) / 2, (1 + level) / 2]
  return {
    "mean_diff": float(diff_U.mean()),
    "mean_ci": np.quantile(mean_Z, q).tolist(),
    "var_diff": float(a_U.var() - b_U.var()),
    "var_ci": np.quantile(var_Z, q).tolist(),
  }


# --------------------------------------------------------------------------------------------
# Generated vs actual sessions (one Python loop over users; each DP row is one numpy step)


def _levenshtein(x: np.ndarray, y: np.ndarray) -> int:
  if len(x) < len(y):
    x, y = y, x
  if len(y) == 0:
    return len(x)
  j_T1 = np.arange(len(y) + 1)
  prev_T1 = j_T1.copy()
  for i, xi in enumerate(x, start=1):
    step_T1 = np.empty_like(prev_T1)
    step_T1[0] = i
    step_T1[1:] = np.minimum(prev_T1[1:] + 1, prev_T1[:-1] + (y != xi))
    # Insertions chain along the row: row[j] = min_{k<=j} step[k] + (j - k).
    prev_T1 = np.minimum.accumulate(step_T1 - j_T1) + j_T1
  return int(prev_T1[-1])


def _lcs(x: np.ndarray, y: np.ndarray) -> int:
  if len(x) < len(y):
    x, y = y, x
  if len(y) == 0:
    return 0
  prev_T1 = np.zeros(len(y) + 1, np.int64)
  for xi in x:
    step_T1 = np.zeros_like(prev_T1)
    step_T1[1:] = np.where(y == xi, prev_T1[:-1] + 1, prev_T1[1:])
    # A match never falls below its left neighbour, so a running max gives the full recurrence.
    prev_T1 = np.maximum.accumulate(step_T1)
  return int(prev_T1[-1])


def _pairs(generated_U: Sequence[np.ndarray], actual_U: Sequence[np.ndarray]):
  if len(generated_U) != len(actual_U):
    raise ValueError("generated and actual must hold the same users")
  return [(np.asarray(g).ravel(), np.asarray(a).ravel()) for g, a in zip(generated_U, actual_U)]


def edit_similarity(generated_U: Sequence[np.ndarray], actual_U: Sequence[np.ndarray]) -> np.ndarray:
  """1 − Levenshtein(gen, actual) / max(len); 1.0 when both are empty."""
  return np.array(
    [
      1.0 - _levenshtein(g, a) / max(len(g), len(a)) if max(len(g), len(a)) else 1.0
      for g, a in _pairs(generated_U, actual_U)
    ],
    np.float64,
  )


def jaccard(generated_U: Sequence[np.ndarray], actual_U: Sequence[np.ndarray]) -> np.ndarray:
  """|set(gen) ∩ set(actual)| / |set(gen) ∪ set(actual)|; 1.0 when both are empty."""
  out = []
  for g, a in _pairs(generated_U, actual_U):
    union = len(np.union1d(g, a))
    out.append(len(np.intersect1d(g, a)) / union if union else 1.0)
  return np.array(out, np.float64)


def rouge_l_f1(generated_U: Sequence[np.ndarray], actual_U: Sequence[np.ndarray]) -> np.ndarray:
  """ROUGE-L F1: 2·LCS / (len(gen) + len(actual)); 1.0 when both are empty, 0 when one is."""
  # With P = LCS/len(gen) and R = LCS/len(actual), 2PR/(P+R) reduces to the line above.
  return np.array(
    [2.0 * _lcs(g, a) / (len(g) + len(a)) if len(g) + len(a) else 1.0 for g, a in _pairs(generated_U, actual_U)],
    np.float64,
  )


def length_error(generated_U: Sequence[np.ndarray], actual_U: Sequence[np.ndarray]) -> np.ndarray:
  """|len(gen) − len(actual)|."""
  return np.array([abs(len(g) - len(a)) for g, a in _pairs(generated_U, actual_U)], np.float64)


def max_repeats(sessions_U: Sequence[np.ndarray]) -> np.ndarray:
  """How often each session's most repeated page occurs in it (0 for an empty session)."""
  return np.array(
    [np.unique(np.asarray(s), return_counts=True)[1].max() if len(s) else 0 for s in sessions_U], np.int64
  )


def repetition_rate(generated_U: Sequence[np.ndarray], real_U: Sequence[np.ndarray], quantile: float = 0.99) -> float:
  """Share of generated sessions that repeat one page more often than `quantile` of real sessions do."""
  limit = np.quantile(max_repeats(real_U), quantile) if len(real_U) else np.inf
  return float((max_repeats(generated_U) > limit).mean()) if len(generated_U) else float("nan")


# --------------------------------------------------------------------------------------------
# Outcomes (e.g. will the next session contain a <cart>)


def outcome_auc(prob_U: np.ndarray, label_U: np.ndarray) -> float:
  """ROC AUC of predicted outcome probabilities; NaN when only one class is present."""
  label_U = np.asarray(label_U, bool)
  if label_U.size == 0 or label_U.all() or not label_U.any():
    return float("nan")
  return float(roc_auc_score(label_U, np.asarray(prob_U, np.float64)))


def outcome_f1(pred_U: np.ndarray, label_U: np.ndarray) -> float:
  """F1 of predicted outcomes (0 when there are no positives at all)."""
  return float(f1_score(np.asarray(label_U, bool), np.asarray(pred_U, bool), zero_division=0))
