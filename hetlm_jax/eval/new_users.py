"""Evaluation on new users (the split by user, --test_users): DESIGN.md's msnbc protocol.

Every test user's whole sequence is scored by models that never saw the user. A new user has no
history to route by, so HeTLM's score is the mixture likelihood log Σ_k π_k p_k(sequence), with π the
clusters' shares of training users: the posterior over clusters sharpens as the user's pages arrive.
The Markov mixture is scored the same way. Per user: `nll` (nats per token, the end marker included)
and `nll_no_end` (nats per page token, each page given that the sequence goes on). Pooled over all
test tokens: bits per token, the protocol's figure. Next-page metrics rank each user's last page
given the pages before it (users with at least two pages), HeTLM weighting its models by their
posterior given those pages.

With --own_users each process scores and ranks its own test users, the baselines are fitted on every process's
training users (their counts summed), and the per-user figures and pooled sums are then brought together.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from absl import logging
from scipy.special import logsumexp

from hetlm_jax import hosts, interrupt
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.data.tokenizer import BOS, EOS, PAD, PageTokenizer
from hetlm_jax.eval.baselines import Markov, MarkovMixture, Popularity
from hetlm_jax.eval.evaluate import (
  EvalOptions,
  LMFamily,
  evaluated,
  every_user_figures,
  hetlm_comparisons,
  per_cluster,
  posterior,
  rank_next_pages,
  summaries,
  unknown_targets,
  write_outputs,
)

PUBLISHED_MIXTURE_K = 40  # Cadez et al.'s mixture of Markov chains on msnbc (DESIGN.md)
# Pooled key, per-user metric and pages_only of the two scorings of every test sequence.
_SCORINGS = (("with_end", "nll", False), ("no_end", "nll_no_end", True))


def _record(out: dict, pooled: dict, key: str, metric: str, nll_U: np.ndarray, tokens_U: np.ndarray) -> None:
  pooled[key] = (float(nll_U.sum()), int(tokens_U.sum()))
  out[metric] = nll_U / np.maximum(tokens_U, 1)


def last_page_view(seqs: UserSequences) -> tuple[np.ndarray, UserSequences]:
  """The users with at least two pages, each split before their last page: (users, view)."""
  page_N = ~np.isin(seqs.tokens, [PAD, BOS, EOS])
  begin_U = seqs.offsets[:-1]  # every sequence holds at least its BOS, so no segment is empty
  last_U = np.maximum.reduceat(np.where(page_N, np.arange(seqs.num_tokens), -1), begin_U)
  pages_U = np.add.reduceat(page_N.astype(np.int64), begin_U)
  users = np.flatnonzero(pages_U >= 2)
  view = seqs.subset(users)
  shift_R = seqs.offsets[users] - view.offsets[:-1]
  return users, dataclasses.replace(view, split=last_U[users] - shift_R)


def _lm_scores(
  family: LMFamily, test: UserSequences, view: UserSequences, tokenizer: PageTokenizer, opts: EvalOptions
) -> tuple[dict, dict, np.ndarray]:
  """Per-user metrics, pooled sums {"with_end": (nll, tokens), "no_end": ...} and the MAP cluster."""
  t, log_pi_K = family.trainer, family.log_prior()
  pooled, out = {}, {}
  for key, metric, pages_only in _SCORINGS:
    nll_KxU, tokens_U = t.score(family.params, test, "target", label=f"{family.name} {key}", pages_only=pages_only)
    joint_KxU = log_pi_K[:, None] - nll_KxU
    _record(out, pooled, key, metric, -logsumexp(joint_KxU, axis=0), tokens_U)
    if not pages_only:
      map_U = np.argmax(joint_KxU, axis=0)
  prefix_KxU, _ = t.score(family.params, view, "history", label=f"{family.name} prefixes")
  log_post_KxU = posterior(log_pi_K, prefix_KxU)

  own = hosts.own_users()  # each process ranks its own users, on its own rows of every batch

  def logprobs(users):
    return logsumexp(log_post_KxU[:, users, None] + t.next_logprobs(family.params, view, users, rows_only=own), axis=0)

  share = t.ranking_share() if own else None
  out.update(rank_next_pages(logprobs, view, tokenizer, opts, t.eval_batch, family.name, share=share))
  return out, pooled, map_U


def _baseline_scores(
  model,
  train: UserSequences,
  test: UserSequences,
  view: UserSequences,
  tokenizer: PageTokenizer,
  opts: EvalOptions,
  batch: int,
  name: str,
) -> tuple[dict, dict]:
  model.fit(train, tokenizer.vocab_size)
  out, pooled = {}, {}
  for key, metric, pages_only in _SCORINGS:
    _record(out, pooled, key, metric, *model.target_nll(test, pages_only=pages_only))

  def logprobs(users):
    return model.next_token_logprobs(view.subset(users))

  out.update(rank_next_pages(logprobs, view, tokenizer, opts, batch, name))
  return out, pooled


def evaluate_new_users(
  families: dict[str, LMFamily],
  train: UserSequences,
  test: UserSequences,
  tokenizer: PageTokenizer,
  workdir: Path,
  opts: EvalOptions = EvalOptions(),
  extra: dict | None = None,
  rounds: list[dict] | None = None,
) -> dict:
  """Writes eval.json and report.md for the split by user; returns the eval.json content."""
  start = time.perf_counter()
  u = test.num_users
  ranked_users, view = last_page_view(test)
  per_user, pooled, map_U = {}, {}, None
  interrupt.at_phase("evaluate")

  def widen(metrics: dict) -> dict:  # ranking metrics exist for the users of the view only
    for key, values in metrics.items():
      if len(values) != u:
        full = np.full(u, np.nan)
        full[ranked_users] = values
        metrics[key] = full
    return metrics

  for name, family in families.items():
    logging.info("evaluating %s on %s new users", name, f"{u:,}")
    metrics, pooled[name], clusters_U = _lm_scores(family, test, view, tokenizer, opts)
    per_user[name] = widen(metrics)
    if name == "hetlm":
      map_U = clusters_U
    evaluated(name)
  k = families["hetlm"].trainer.k if "hetlm" in families else 1
  batch = next(iter(families.values())).trainer.eval_batch if families else 512
  baselines = {
    "popularity": Popularity(),
    "markov": Markov(),
    "markov_mixture": MarkovMixture(max(k, 2), seed=opts.seed, by_id=opts.by_id),
    f"markov_mixture_k{PUBLISHED_MIXTURE_K}": MarkovMixture(PUBLISHED_MIXTURE_K, seed=opts.seed, by_id=opts.by_id),
  }
  for name, model in baselines.items():
    logging.info("evaluating %s", name)
    metrics, pooled[name] = _baseline_scores(model, train, test, view, tokenizer, opts, batch, name)
    per_user[name] = widen(metrics)
    evaluated(name)

  per_user, _, map_U, unknown = every_user_figures(per_user, np.ones(u, bool), map_U, unknown_targets(view))
  if hosts.own_users():  # the pooled sums, and the counts, of every process's users
    pooled = {
      name: {key: tuple(x.item() for x in hosts.total(*map(np.array, v))) for key, v in p.items()}
      for name, p in pooled.items()
    }
  u, ranked, train_users = (int(x) for x in hosts.total(*map(np.array, (u, len(ranked_users), train.num_users))))
  bits = {
    name: {key: total / max(tokens, 1) / np.log(2) for key, (total, tokens) in p.items()} for name, p in pooled.items()
  }
  report = {
    "protocol": "new_users",
    "models": summaries(per_user),
    "bits_per_token": bits,
    "n_users": u,
    "ranked_users": ranked,
    "unknown_targets": unknown,
    "train_users": train_users,
    "test_tokens": {key: t for key, (_, t) in next(iter(pooled.values())).items()},
    **(extra or {}),
  }
  if "hetlm" in per_user:
    report["bootstrap"] = hetlm_comparisons(per_user, ("nll", "nll_no_end", "hr@10"), opts)
    report["clusters"] = per_cluster(per_user, map_U, k)
  report["eval_s"] = time.perf_counter() - start
  write_outputs(workdir, report, {name: m["nll"] for name, m in per_user.items()}, rounds)
  return report
