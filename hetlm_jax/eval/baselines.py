"""Classic clickstream baselines: page popularity, a first-order Markov chain and a mixture of chains.

Every model is fitted on users' histories only and scores a held-out target like the LMs do: the
NLL of target token t is -log p(t | all of the user's earlier tokens), in nats, summed per user.
Smoothing is additive (`alpha` on every count), so no token ever has probability zero.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from scipy.special import logsumexp

from hetlm_jax import hosts
from hetlm_jax.data.ownership import key_streams, uniform, user_keys
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.data.tokenizer import BOS, EOS, PAD

_ENDS = np.array([PAD, BOS, EOS])  # tokens that are not pages: renormalised away with pages_only


def _ranges(start_U: np.ndarray, end_U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(user_N, pos_N): every position in [start_U[u], end_U[u]) of every user, users in order."""
  len_U = np.maximum(np.asarray(end_U, np.int64) - start_U, 0)
  user_N = np.repeat(np.arange(len(len_U)), len_U)
  pos_N = (
    np.arange(int(len_U.sum()), dtype=np.int64)
    - np.repeat(np.cumsum(len_U) - len_U, len_U)
    + np.repeat(np.asarray(start_U, np.int64), len_U)
  )
  return user_N, pos_N


def _history_pairs(seqs: UserSequences) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user_N, prev_N, next_N) of every consecutive pair inside each user's history."""
  user_N, pos_N = _ranges(seqs.offsets[:-1] + 1, seqs.split)
  tokens = seqs.tokens.astype(np.int64)
  return user_N, tokens[pos_N - 1], tokens[pos_N]


def _target_pairs(seqs: UserSequences, pages_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(user_N, prev_N, next_N) for every target token (with `pages_only`, every one but BOS and EOS);
  its predecessor may be the last history token."""
  # Every history holds at least its BOS, so pos - 1 never leaves the user.
  user_N, pos_N = _ranges(seqs.split, seqs.offsets[1:])
  tokens = seqs.tokens.astype(np.int64)
  if pages_only:
    keep_N = ~np.isin(tokens[pos_N], _ENDS)
    user_N, pos_N = user_N[keep_N], pos_N[keep_N]
  return user_N, tokens[pos_N - 1], tokens[pos_N]


def _counts(user_N: np.ndarray, u: int) -> np.ndarray:
  return np.bincount(user_N, minlength=u).astype(np.int64)


def _positions(seqs: UserSequences, at_U: np.ndarray | None) -> np.ndarray:
  """[U] absolute position of the token to predict: `at_U`, by default each target's first token."""
  if at_U is None:
    return seqs.split.astype(np.int64)
  at_U = np.asarray(at_U, np.int64)
  if at_U.shape != seqs.split.shape or (at_U < seqs.split).any() or (at_U >= seqs.offsets[1:]).any():
    raise ValueError("at_U must give one position inside each user's target")
  return at_U


def _check_tokens(seqs: UserSequences, vocab_size: int) -> None:
  if seqs.tokens.size and (seqs.tokens.min() < 0 or seqs.tokens.max() >= vocab_size):
    raise ValueError(f"token ids must lie in [0, {vocab_size})")


class _PairTable:
  """K smoothed V×V transition matrices, storing only the pairs seen in training.

  A_k[a, b] = (c_k[a, b] + alpha) / (Σ_b' c_k[a, b'] + alpha·V); unseen pairs have c = 0. Sparse
  so that large page vocabularies (V² entries) stay cheap.
  """

  def __init__(self, keys_P: np.ndarray, counts_KxP: np.ndarray, vocab_size: int, alpha: float):
    self.keys_P, self.counts_KxP = keys_P, counts_KxP
    self.vocab_size, self.alpha = vocab_size, alpha
    self.prev_P = keys_P // vocab_size
    rows_KxV = np.stack([np.bincount(self.prev_P, weights=c_P, minlength=vocab_size) for c_P in counts_KxP])
    self.log_norm_KxV = np.log(rows_KxV + alpha * vocab_size)

  def log_prob_seen(self) -> np.ndarray:
    """[K, P] log A_k at the stored pairs."""
    return np.log(self.counts_KxP + self.alpha) - self.log_norm_KxV[:, self.prev_P]

  def log_prob(self, prev_N: np.ndarray, next_N: np.ndarray) -> np.ndarray:
    """[K, N] log A_k[prev, next] for any pairs."""
    key_N = prev_N * self.vocab_size + next_N
    p = len(self.keys_P)
    idx_N = np.minimum(np.searchsorted(self.keys_P, key_N), max(p - 1, 0))
    seen_N = (self.keys_P[idx_N] == key_N) if p else np.zeros(len(key_N), bool)
    count_KxN = np.where(seen_N, self.counts_KxP[:, idx_N] if p else 0.0, 0.0)
    return np.log(count_KxN + self.alpha) - self.log_norm_KxV[:, prev_N]

  def log_continue(self, prev_N: np.ndarray) -> np.ndarray:
    """[K, N] log(1 − Σ_{e ∈ PAD, BOS, EOS} A_k[prev, e]): the chance that a page follows `prev`."""
    end_KxN = sum(np.exp(self.log_prob(prev_N, np.full(len(prev_N), e, np.int64))) for e in _ENDS)
    return np.log1p(-end_KxN)

  def log_rows(self, prev_U: np.ndarray, k: int) -> np.ndarray:
    """[U, V] log A_k[prev_U[u], :]."""
    v = self.vocab_size
    log_norm_U = self.log_norm_KxV[k, prev_U]
    out_UxV = np.repeat((np.log(self.alpha) - log_norm_U)[:, None], v, axis=1)
    lo_U = np.searchsorted(self.keys_P, prev_U * v)
    hi_U = np.searchsorted(self.keys_P, (prev_U + 1) * v)
    user_N, j_N = _ranges(lo_U, hi_U)
    out_UxV[user_N, self.keys_P[j_N] % v] = np.log(self.counts_KxP[k, j_N] + self.alpha) - log_norm_U[user_N]
    return out_UxV

  def log_prior(self) -> np.ndarray:
    """[K] alpha · Σ_{a,b} log A_k[a, b]: the Dirichlet(alpha+1) log prior the smoothing maximises."""
    v = self.vocab_size
    unseen_V = v - np.bincount(self.prev_P, minlength=v)
    # Seen cells from the stored pairs; each unseen cell of row a holds log alpha - log_norm[a].
    total_K = (
      self.log_prob_seen().sum(axis=1)
      + (unseen_V * np.log(self.alpha)).sum()
      - (unseen_V[None, :] * self.log_norm_KxV).sum(axis=1)
    )
    return self.alpha * total_K


def _fit_table(prev_N: np.ndarray, next_N: np.ndarray, vocab_size: int, alpha: float) -> _PairTable:
  """One chain (K = 1) from plain pair counts (with --own_users, every process's)."""
  if hosts.own_users():
    keys_P, inv_N = _pairs(prev_N, next_N, vocab_size)
    (count_P,) = hosts.total(np.bincount(inv_N, minlength=len(keys_P)))
  else:
    keys_P, count_P = np.unique(prev_N * vocab_size + next_N, return_counts=True)
  return _PairTable(keys_P, count_P.astype(np.float64)[None, :], vocab_size, alpha)


def _pairs(prev_N: np.ndarray, next_N: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(keys_P, inv_N): the distinct (prev, next) pairs as prev x V + next, of every process's users with
  --own_users (every process must then call this at the same point), and each pair's index among them."""
  keys_N = prev_N * vocab_size + next_N
  if not hosts.own_users():
    return np.unique(keys_N, return_inverse=True)
  keys_P = np.unique(np.concatenate([got[0] for got in hosts.gather_arrays(np.unique(keys_N))]))
  return keys_P, np.searchsorted(keys_P, keys_N)


class Popularity:
  """Unigram over every predicted history token (all but each history's opening BOS)."""

  def __init__(self, alpha: float = 0.1):
    if alpha <= 0:
      raise ValueError("alpha must be positive")
    self.alpha = alpha

  def fit(self, seqs: UserSequences, vocab_size: int) -> Popularity:
    """Counts the pages of every history."""
    _check_tokens(seqs, vocab_size)
    _, pos_N = _ranges(seqs.offsets[:-1] + 1, seqs.split)
    (counts_V,) = hosts.total(np.bincount(seqs.tokens[pos_N], minlength=vocab_size))
    self.vocab_size = vocab_size
    self.logp_V = np.log(counts_V + self.alpha) - np.log(counts_V.sum() + self.alpha * vocab_size)
    return self

  def target_nll(self, seqs: UserSequences, pages_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(nll_sum_U float64, tokens_U int64) of every user's target; `pages_only`: page tokens only, each
    given that the sequence goes on."""
    user_N, _, next_N = _target_pairs(seqs, pages_only)
    logp_V = self.logp_V - (np.log1p(-np.exp(self.logp_V[_ENDS]).sum()) if pages_only else 0.0)
    nll_U = -np.bincount(user_N, weights=logp_V[next_N], minlength=seqs.num_users)
    return nll_U, _counts(user_N, seqs.num_users)

  def next_token_logprobs(self, seqs: UserSequences, at_U: np.ndarray | None = None) -> np.ndarray:
    """[U, V] log p(token at at_U | earlier tokens); at_U defaults to the first target token."""
    _positions(seqs, at_U)  # validated only: a unigram ignores the context
    return np.repeat(self.logp_V[None, :], seqs.num_users, axis=0)


class Markov:
  """First-order chain p(next | prev) from the consecutive pairs of every history."""

  def __init__(self, alpha: float = 0.1):
    if alpha <= 0:
      raise ValueError("alpha must be positive")
    self.alpha = alpha

  def fit(self, seqs: UserSequences, vocab_size: int) -> Markov:
    """Counts the consecutive pairs of every history."""
    _check_tokens(seqs, vocab_size)
    _, prev_N, next_N = _history_pairs(seqs)
    self.vocab_size = vocab_size
    self.table_ = _fit_table(prev_N, next_N, vocab_size, self.alpha)
    return self

  def target_nll(self, seqs: UserSequences, pages_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(nll_sum_U float64, tokens_U int64) of every user's target; `pages_only`: as Popularity's."""
    user_N, prev_N, next_N = _target_pairs(seqs, pages_only)
    ll_N = self.table_.log_prob(prev_N, next_N)[0]
    if pages_only:
      ll_N = ll_N - self.table_.log_continue(prev_N)[0]
    return -np.bincount(user_N, weights=ll_N, minlength=seqs.num_users), _counts(user_N, seqs.num_users)

  def next_token_logprobs(self, seqs: UserSequences, at_U: np.ndarray | None = None) -> np.ndarray:
    """[U, V] log p(token at at_U | the token before it); at_U defaults to the first target token."""
    return self.table_.log_rows(seqs.tokens[_positions(seqs, at_U) - 1].astype(np.int64), 0)


class MarkovMixture:
  """Mixture of K first-order Markov chains fitted by EM over users' histories (Cadez et al. 2003).

  A user's whole history comes from one component k: P(history) = Σ_k π_k Π_pairs A_k[prev, next].
  """

  def __init__(self, k: int, iters: int = 50, seed: int = 0, alpha: float = 0.1, tol: float = 0.0, by_id: bool = False):
    """`tol` > 0 stops EM early once the objective rises by less than tol·|objective|. `by_id`: each user's starting
    responsibilities come from a seeded hash of its id (the same whatever the other users and the number of
    processes); else from one numpy generator over the users in order."""
    if k < 1 or iters < 1 or alpha <= 0:
      raise ValueError("need k >= 1, iters >= 1 and alpha > 0")
    self.k, self.iters, self.seed, self.alpha, self.tol, self.by_id = k, iters, seed, alpha, tol, by_id

  def fit(self, seqs: UserSequences, vocab_size: int) -> MarkovMixture:
    """EM from random responsibilities; records history_ll_ and objective_ after every M-step.

    history_ll_[i] is Σ_u log P(history_u) under the parameters of iteration i. EM with additive
    smoothing is MAP-EM, so what it provably never decreases is objective_ = history_ll_ + the
    Dirichlet(alpha+1) log prior of the transition matrices.
    """
    _check_tokens(seqs, vocab_size)
    self.vocab_size = vocab_size
    u, own = seqs.num_users, hosts.own_users()  # with --own_users, every process fits on its own users together
    user_N, prev_N, next_N = _history_pairs(seqs)
    keys_P, inv_N = _pairs(prev_N, next_N, vocab_size)
    if self.by_id or own:  # Dirichlet(1): normalised exponentials, each user's from its id
      keys_U = user_keys(pa.array(seqs.user_ids.astype(str), pa.large_string()), self.seed, 29)
      exp_UxK = -np.log1p(-uniform(key_streams(keys_U, self.k)))
      resp_UxK = exp_UxK / exp_UxK.sum(axis=1, keepdims=True)
    else:
      resp_UxK = np.random.default_rng(self.seed).dirichlet(np.ones(self.k), size=u)
    (users,) = hosts.total(np.array(u))
    self.history_ll_: list[float] = []
    self.objective_: list[float] = []
    for _ in range(self.iters):
      # M-step: responsibility-weighted pair counts, then mixing weights.
      counts_KxP = np.stack(
        [np.bincount(inv_N, weights=resp_UxK[user_N, k], minlength=len(keys_P)) for k in range(self.k)]
      )
      if own:
        counts_KxP, resp_K = hosts.total(counts_KxP, resp_UxK.sum(axis=0))
      self.table_ = _PairTable(keys_P, counts_KxP, vocab_size, self.alpha)
      self.pi_K = resp_K / max(int(users), 1) if own else resp_UxK.mean(axis=0)
      # E-step: per-user log-likelihood under every component, summed over the flat pair arrays.
      ll_KxP = self.table_.log_prob_seen()
      joint_UxK = self._log_pi() + np.stack(
        [np.bincount(user_N, weights=ll_KxP[k, inv_N], minlength=u) for k in range(self.k)], axis=1
      )
      ll_U = logsumexp(joint_UxK, axis=1)
      resp_UxK = np.exp(joint_UxK - ll_U[:, None])
      self.history_ll_.append(float(hosts.total(ll_U.sum())[0]))
      self.objective_.append(self.history_ll_[-1] + float(self.table_.log_prior().sum()))
      if (
        self.tol > 0
        and len(self.objective_) > 1
        and self.objective_[-1] - self.objective_[-2] < self.tol * abs(self.objective_[-1])
      ):
        break
    return self

  def _log_pi(self) -> np.ndarray:
    with np.errstate(divide="ignore"):  # an emptied component keeps weight 0 for good
      return np.log(self.pi_K)

  def _history_log_joint(self, seqs: UserSequences) -> np.ndarray:
    """[U, K] log π_k + log P(history_u | k)."""
    user_N, prev_N, next_N = _history_pairs(seqs)
    ll_KxN = self.table_.log_prob(prev_N, next_N)
    return self._log_pi() + np.stack(
      [np.bincount(user_N, weights=ll_N, minlength=seqs.num_users) for ll_N in ll_KxN], axis=1
    )

  def responsibilities(self, seqs: UserSequences) -> np.ndarray:
    """[U, K] posterior over components given each user's history."""
    joint_UxK = self._history_log_joint(seqs)
    return np.exp(joint_UxK - logsumexp(joint_UxK, axis=1, keepdims=True))

  def target_nll(self, seqs: UserSequences, pages_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(nll_sum_U, tokens_U); the posterior over components is updated after every target token.
    `pages_only`: as Popularity's (each chain's next-page distribution given that the sequence goes on)."""
    joint_UxK = self._history_log_joint(seqs)
    user_N, prev_N, next_N = _target_pairs(seqs, pages_only)
    ll_KxN = self.table_.log_prob(prev_N, next_N)
    if pages_only:
      ll_KxN = ll_KxN - self.table_.log_continue(prev_N)
    len_U = _counts(user_N, seqs.num_users)
    # Target log-likelihood so far, before token n: an exclusive cumsum restarted at each user.
    before_KxN = np.cumsum(ll_KxN, axis=1) - ll_KxN
    start_N = np.repeat(np.cumsum(len_U) - len_U, len_U)
    before_KxN -= before_KxN[:, start_N]
    log_post_KxN = joint_UxK[user_N].T + before_KxN
    logp_N = logsumexp(log_post_KxN + ll_KxN, axis=0) - logsumexp(log_post_KxN, axis=0)
    return -np.bincount(user_N, weights=logp_N, minlength=seqs.num_users), len_U

  def next_token_logprobs(self, seqs: UserSequences, at_U: np.ndarray | None = None) -> np.ndarray:
    """[U, V] log Σ_k P(k | tokens before at_U) A_k[token before at_U, :].

    at_U defaults to the first target token; target tokens before it also update the posterior.
    """
    at_U = _positions(seqs, at_U)
    joint_UxK = self._history_log_joint(seqs)
    user_N, pos_N = _ranges(seqs.split, at_U)
    tokens = seqs.tokens.astype(np.int64)
    for k, ll_N in enumerate(self.table_.log_prob(tokens[pos_N - 1], tokens[pos_N])):
      joint_UxK[:, k] += np.bincount(user_N, weights=ll_N, minlength=seqs.num_users)
    log_resp_UxK = joint_UxK - logsumexp(joint_UxK, axis=1, keepdims=True)
    last_U = tokens[at_U - 1]
    out_UxV = np.full((seqs.num_users, self.vocab_size), -np.inf)
    for k in range(self.k):
      out_UxV = np.logaddexp(out_UxV, log_resp_UxK[:, k : k + 1] + self.table_.log_rows(last_U, k))
    return out_UxV
