"""Host-side cluster assignment: initial assignments, perplexity reassignment, no silent degeneracy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.preprocessing import normalize

from hetlm_jax import hosts
from hetlm_jax.data.ownership import smallest_keys, user_keys
from hetlm_jax.data.sequences import UserSequences

_TRANSITION_BUCKETS = 1 << 16  # page-pair features are hashed into this many columns


def random_balanced(num_users: int, k: int, seed: int) -> np.ndarray:
  """Every cluster gets ⌊U/K⌋ or ⌈U/K⌉ users, at random."""
  return (np.random.default_rng(seed).permutation(num_users) % k).astype(np.int32)


def random_by_id(user_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Every user to a cluster drawn from a seeded hash of their id alone (--split=hash): the same whatever the other
  users and the number of processes; balanced in expectation, not exactly."""
  return (user_keys(pa.array(user_ids.astype(str), pa.large_string()), seed, 11) % np.uint64(k)).astype(np.int32)


def user_features(seqs: UserSequences, vocab_size: int) -> sp.csr_matrix:
  """Sparse per-user counts of pages and of page→page transitions in the history (never the target)."""
  hist_len_U = seqs.split - seqs.offsets[:-1]
  user_N = np.repeat(np.arange(seqs.num_users), hist_len_U)
  index_N = np.arange(int(hist_len_U.sum())) - np.repeat(np.cumsum(hist_len_U) - hist_len_U, hist_len_U)
  token_N = seqs.tokens[np.repeat(seqs.offsets[:-1], hist_len_U) + index_N].astype(np.int64)
  same_user = user_N[1:] == user_N[:-1]
  pair_col = vocab_size + (token_N[:-1] * vocab_size + token_N[1:])[same_user] % _TRANSITION_BUCKETS
  rows = np.concatenate([user_N, user_N[1:][same_user]])
  cols = np.concatenate([token_N, pair_col])
  shape = (seqs.num_users, vocab_size + _TRANSITION_BUCKETS)
  return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)


def kmeans(x, k: int, seed: int) -> np.ndarray:
  """k-means (scikit-learn) on L2-normalised rows."""
  return KMeans(k, n_init=4, random_state=seed).fit_predict(normalize(x)).astype(np.int32)


def embedding_kmeans(
  trainer, params, seqs: UserSequences, k: int, seed: int, most_users: int, by_id: bool = False
) -> np.ndarray:
  """`kmeans` of the users' mean hidden states under a single LM (`trainer`, a train/loop.Trainer with K=1, and its
  `params`). Past `most_users` users, it is fitted on that many of them, drawn by a seeded hash of their ids (the
  same users whatever the number of processes), and every user goes to the nearest centre: each group of processes
  labels its own users and only the labels are gathered, so no process holds every user's hidden state.

  `by_id` (--split=hash), and always with --own_users: the fit's users (all of them up to `most_users`) are taken in
  the order of their keys, so the fit is the same whatever the number of processes; with --own_users each process
  embeds its own drawn users (below the `most_users`-th smallest key of all), their hidden states are brought
  together for the fit, and each process labels its own users."""
  by_id = by_id or hosts.own_users()
  if seqs.num_users <= most_users and not by_id:
    return kmeans(trainer.embed(params, seqs)[0], k, seed)
  keys = user_keys(pa.array(seqs.user_ids.astype(str), pa.large_string()), seed, 13)
  if by_id:  # the draw's last key, from each process's smallest; the drawn users in key order
    order = np.argsort(keys, kind="stable")
    fitted = order[keys[order] <= smallest_keys(keys, most_users)[-1]]
    drawn_UxD, drawn_keys = hosts.every_user(trainer.embed(params, seqs.subset(fitted))[0], keys[fitted])
    drawn_UxD = drawn_UxD[np.argsort(drawn_keys, kind="stable")]
  else:
    fitted = np.sort(np.argpartition(keys, most_users - 1)[:most_users])
    drawn_UxD = trainer.embed(params, seqs.subset(fitted))[0]
  centres = KMeans(k, n_init=4, random_state=seed).fit(normalize(drawn_UxD))
  users, means_UxD = trainer.embed_share(params, seqs)
  labels_U = centres.predict(normalize(means_UxD[:, : trainer.cfg.model.d_model])).astype(np.int32)
  return trainer.gather_users(users, seqs.num_users, labels_U)[0]


def kmeans_on_features(seqs: UserSequences, vocab_size: int, k: int, seed: int, dims: int = 64) -> np.ndarray:
  """TF-IDF weighted page and transition counts, reduced by truncated SVD, then k-means."""
  x = TfidfTransformer().fit_transform(user_features(seqs, vocab_size))
  x = x[:, np.flatnonzero(x.getnnz(axis=0))]
  if x.shape[1] > dims + 1:
    x = TruncatedSVD(dims, random_state=seed).fit_transform(x)
  return kmeans(x, k, seed)


@dataclasses.dataclass
class Reassignment:
  """What an E-step's reassignment did: the new clusters, the share moved, and the clusters re-seeded."""

  assignment: np.ndarray  # [U] new cluster of every user
  moved: float  # fraction of users whose cluster changed
  sizes: np.ndarray  # [K] users per cluster after repair
  reseeded: dict  # {small cluster: the cluster it was split from}
  source: np.ndarray  # [K] model each cluster's parameters should now be copied from


def min_cluster_size(num_users: int, k: int, fraction: float) -> int:
  """Users below which a cluster is re-seeded: `fraction` of a balanced share U/K, at least 1."""
  return max(1, int(np.ceil(fraction * num_users / k)))


ONE_GROUP = hosts.Groups()  # a job of one process, or a caller that holds every user's scores


def reassign(
  nll_per_token_KxU: np.ndarray, current_U: np.ndarray, min_size: int, groups: hosts.Groups = ONE_GROUP
) -> Reassignment:
  """Each user to the model with the lowest per-token NLL of their history; then no cluster below min_size.

  A cluster that falls below `min_size` is re-seeded: its users go to their next-best model, and the
  worst-fitting half of the largest cluster (by NLL under its own model) moves into it; the caller
  copies the split cluster's parameters into the re-seeded one (`source`).

  In a job whose process groups each score their own share of the users (`groups`; the shares in user order),
  each decides its own users' clusters: the arrays here are the share's, and only cluster sizes, the number moved
  and, when a cluster is re-seeded, the donors' NLL (a scalar a donor) pass between the groups, so the result is
  the one a single process would reach on every user."""
  k, u = nll_per_token_KxU.shape
  num_users = int(groups.sum(np.array(u))[0])
  sizes = lambda: groups.sum(np.bincount(new_U, minlength=k))[0]
  new_U = np.argmin(nll_per_token_KxU, axis=0).astype(np.int32)
  source = np.arange(k)
  reseeded = {}
  nll = nll_per_token_KxU.copy()
  for _ in range(k):  # at most K repairs, each on the host over arrays of users
    sizes_K = sizes()
    small = np.flatnonzero(sizes_K < min_size)
    if len(small) == 0 or num_users < 2 * min_size:
      break
    c = int(small[np.argmin(sizes_K[small])])
    nll[c] = np.inf
    members = np.flatnonzero(new_U == c)
    new_U[members] = np.argmin(nll[:, members], axis=0)
    largest = int(np.argmax(sizes()))
    donors = np.flatnonzero(new_U == largest)
    new_U[donors[_worst_half(nll_per_token_KxU[largest, donors], groups)]] = c
    source[c] = source[largest]
    reseeded[c] = largest
  return Reassignment(
    assignment=new_U,
    moved=float(groups.sum(np.array(np.count_nonzero(new_U != current_U)))[0] / max(num_users, 1)),
    sizes=sizes(),
    reseeded=reseeded,
    source=source,
  )


def _worst_half(nll_D: np.ndarray, groups: hosts.Groups) -> np.ndarray:
  """Which of this group's donors (`nll_D`, in user order) are in the worst-fitting half of every group's donors:
  the highest NLL first, ties to the earlier user."""
  every = groups.each(nll_D)
  first = sum(len(group[0]) for group in every[: groups.index])
  joined = np.concatenate([group[0] for group in every])
  worst = np.argsort(-joined, kind="stable")[: len(joined) // 2]
  mine = worst[(worst >= first) & (worst < first + len(nll_D))] - first
  return np.sort(mine)


def cluster_shares(assignment_U: np.ndarray, weights_UxK: np.ndarray | None, k: int, mine: bool = True) -> np.ndarray:
  """[K] the clusters' shares of users: mean responsibilities under soft EM, else of the assignment. With
  --own_users, the arrays are this process's users' and the shares every process's (`mine`), unless `mine` is False:
  the arrays are then every user's already (a trained run's, `load_run`)."""
  if mine and hosts.own_users():
    mine_K = np.bincount(assignment_U, minlength=k) if weights_UxK is None else np.asarray(weights_UxK).sum(axis=0)
    sum_K, users = hosts.total(mine_K, np.array(len(assignment_U)))
    return sum_K / max(int(users), 1)
  if weights_UxK is not None:
    return weights_UxK.mean(axis=0)
  return np.bincount(assignment_U, minlength=k) / max(len(assignment_U), 1)


def log_shares(share_K: np.ndarray) -> np.ndarray:
  """[K] log π_k, the mixture prior over clusters (an empty cluster gets log 1e-12, not -inf)."""
  return np.log(np.maximum(share_K, 1e-12))
