"""Per-user evaluation of every model on the held-out targets, in one harness: eval.json and report.md.

A user's cluster comes from their history alone (the assignment at the end of training, or, for users
the models never saw, the lowest history perplexity). Metrics per user, then mean/var/std/p10/p50/p90.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from absl import logging
from scipy.special import logsumexp

from hetlm_jax import hosts, interrupt
from hetlm_jax.cluster.assign import cluster_shares, log_shares
from hetlm_jax.data.ownership import smallest_keys, user_keys
from hetlm_jax.data.sequences import UserSequences, session_length_from_data
from hetlm_jax.data.tokenizer import BOS, UNK, PageTokenizer
from hetlm_jax.eval import metrics as M
from hetlm_jax.eval.baselines import Markov, MarkovMixture, Popularity
from hetlm_jax.eval.generate import Sampling, generate
from hetlm_jax.files import replace_text
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import Progress
from hetlm_jax.workdir import EVAL_FILE

LM_NAMES = ("hetlm", "single", "single_ft", "single_matched")
_ALIGNMENT = ("edit_similarity", "jaccard", "rouge_l_f1")  # generated vs actual next session, NaN if not generated
_GENERATED = (
  ("edit_similarity", M.edit_similarity),
  ("jaccard", M.jaccard),
  ("rouge_l_f1", M.rouge_l_f1),
  ("length_error", M.length_error),
)


@dataclasses.dataclass
class LMFamily:
  """A trained model family (K stacked models; K=1 for the single LMs) and each user's model."""

  name: str
  trainer: Trainer
  params: object
  assignment: np.ndarray
  shares: np.ndarray | None = None  # [K] the mixture's prior π; None: the clusters' shares of `assignment`
  # (users, [K, R]): this process group's users' history NLL sums under `params` (Trainer.score_share), if known
  history_share: tuple | None = None

  def log_prior(self) -> np.ndarray:
    """[K] log π_k of the mixture likelihood log Σ_k π_k p_k(·)."""
    share_K = self.shares if self.shares is not None else cluster_shares(self.assignment, None, self.trainer.k)
    return log_shares(share_K)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How much the evaluation samples: generated users, outcome samples, negatives, bootstrap resamples, seed."""

  generate_users: int = 500  # users whose next session is generated (greedy), for session metrics
  outcome_samples: int = 8  # sampled continuations per user for the outcome probability
  max_new: int = 20
  negatives: int = 100
  bootstrap: int = 1000
  seed: int = 0
  # What is drawn per user (the generated users, the negatives, the Markov mixture's start) by a seeded hash of
  # the user's id, so that it does not depend on the other users or the number of processes (--split=hash).
  by_id: bool = False


def first_page_index(seqs: UserSequences) -> np.ndarray:
  """Where the token the next-page metrics rank sits: the target's first token, after its BOS if it
  opens a session."""
  opens_session_U = (seqs.tokens[seqs.split] == BOS) & (seqs.split + 1 < seqs.offsets[1:])
  return seqs.split + opens_session_U


def route(history_KxU: np.ndarray, tokens_U: np.ndarray) -> np.ndarray:
  """[U] the model with the lowest per-token NLL of each user's history: the E-step's rule (assign.reassign)
  before its repair of small clusters, and how every user the models never saw is routed."""
  return np.argmin(history_KxU / np.maximum(tokens_U, 1), axis=0).astype(np.int32)


def posterior(log_prior_K: np.ndarray, history_KxU: np.ndarray) -> np.ndarray:
  """[K, U] log P(k | history) ∝ log π_k − NLL_k(history): the mixture's weights given what a user did."""
  log_post_KxU = log_prior_K[:, None] - history_KxU
  return log_post_KxU - logsumexp(log_post_KxU, axis=0, keepdims=True)


def route_by_history(family: LMFamily, seqs: UserSequences) -> np.ndarray:
  """Cluster of every user by the lowest per-token NLL of their history (never the target)."""
  return route(*family.trainer.score(family.params, seqs, "history", label=f"{family.name} routing"))


def per_user_nll(family, seqs: UserSequences, mixture: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
  """[U] each user's held-out target NLL (nats/token) under the model of their cluster and, with `mixture`, [U]
  the mixture likelihood's (`mixture_nll`), else None. `family`: an LMFamily or alike.

  Each group of processes scores its own share of the users (Trainer.score_share) and only these per-user
  scalars pass between the groups, never the K models' scores. The history scores of the mixture are the
  family's `history_share` when training's last E-step left them (the same computation on the same parameters
  and users), else computed here."""
  trainer = family.trainer
  users, nll_KxR, tokens_R = trainer.score_share(family.params, seqs, "target", label=f"{family.name} eval")
  own_R = nll_KxR[family.assignment[users], np.arange(len(users))] / np.maximum(tokens_R, 1)
  gather = functools.partial(trainer.gather_users, users, seqs.num_users)
  if not mixture:
    return gather(own_R)[0], None
  known = getattr(family, "history_share", None)
  if known is not None and np.array_equal(known[0], users) and known[1].shape == nll_KxR.shape:
    history_KxR = known[1]
  else:
    label = f"{family.name} history posterior"
    history_KxR = trainer.score_share(family.params, seqs, "history", label=label)[1]
  return tuple(gather(own_R, mixture_nll(family.log_prior(), history_KxR, nll_KxR, tokens_R)))


def mixture_nll(log_prior_K: np.ndarray, history_KxU: np.ndarray, nll_KxU: np.ndarray, tokens_U: np.ndarray):
  """[U] −log Σ_k P(k | history_u) p_k(target_u | history_u) per target token, P(k | history) ∝
  π_k p_k(history): the mixture likelihood of the target given everything seen before it, from the log prior
  log π, the history NLL sums [K, U], the target's [K, U] and its scored token counts [U]."""
  return -logsumexp(posterior(log_prior_K, history_KxU) - nll_KxU, axis=0) / np.maximum(tokens_U, 1)


def _page_tokens(tokens: np.ndarray, tokenizer: PageTokenizer) -> np.ndarray:
  return tokens[tokens >= tokenizer.num_specials]


def generation_sampling(seqs: UserSequences, tokenizer: PageTokenizer, opts: EvalOptions) -> Sampling:
  """How the evaluation generates next sessions: the default decoding, and a length from the data when the
  training histories never end a session (see session_length_from_data)."""
  length = session_length_from_data(seqs, tokenizer.num_specials)
  return Sampling(max_new=opts.max_new if length is None else min(opts.max_new, length))


@dataclasses.dataclass(frozen=True)
class Drawn:
  """The users whose next session is generated: `users` of `seqs`, whose metrics go to positions `at` of the per-user
  arrays. One process, or every process holding every user: `seqs` is the evaluated users and `at` is `users`. With
  --own_users, `seqs` is every process's drawn users brought together (a few hundred users' tokens, so that every
  process generates the same, as one program over every device must), `users` all of them, `at` their positions
  among every process's users one after the other, and `mine` this process's drawn users (indices into its own)."""

  seqs: UserSequences
  users: np.ndarray
  at: np.ndarray
  mine: np.ndarray | None = None

  def assignment(self, assignment_U: np.ndarray) -> np.ndarray:
    """The cluster of every user of `seqs`, from this process's users' `assignment_U`."""
    return assignment_U if self.mine is None else hosts.every_user(assignment_U[self.mine])[0]


def draw_users(seqs: UserSequences, evaluated_U: np.ndarray, opts: EvalOptions) -> Drawn:
  """opts.generate_users of the evaluated users at random (seeded): by numpy's generator among `seqs`' evaluated
  users, or (opts.by_id, and always with --own_users) the smallest keys of a seeded hash of their ids, among every
  process's users with --own_users."""
  candidates = np.flatnonzero(evaluated_U)
  if not (opts.by_id or hosts.own_users()):
    rng = np.random.default_rng(opts.seed)
    users = np.sort(rng.choice(candidates, min(opts.generate_users, len(candidates)), replace=False))
    return Drawn(seqs, users, users)
  keys = user_keys(pa.array(seqs.user_ids[candidates].astype(str), pa.large_string()), opts.seed, 17)
  smallest = smallest_keys(keys, opts.generate_users)
  mine = candidates[keys <= smallest[-1]] if len(smallest) else candidates[:0]
  if not hosts.own_users():
    return Drawn(seqs, mine, mine)
  first = np.cumsum([0, *(int(n) for n in hosts.every_user(np.array([seqs.num_users]))[0])])
  at = np.concatenate([got[0] + first[p] for p, got in enumerate(hosts.gather_arrays(mine))])
  together = UserSequences.concat(
    [UserSequences.from_table(t) for t in hosts.gather_tables(seqs.subset(mine).to_table())]
  )
  return Drawn(together, np.arange(together.num_users), at, mine)


def _lm_metrics(
  family: LMFamily,
  seqs: UserSequences,
  tokenizer: PageTokenizer,
  opts: EvalOptions,
  drawn: Drawn,
  mixture: bool = False,
) -> tuple[dict, np.ndarray | None]:
  """Per-user metric arrays of one LM family, and, with `mixture`, its mixture likelihood's NLL per user; the
  generation's metrics are of `drawn`'s users alone (`evaluate` puts them in place)."""
  out = {}
  out["nll"], mixture_U = per_user_nll(family, seqs, mixture)
  out.update(
    rank_next_pages(
      lambda users: family.trainer.next_logprobs(family.params, seqs, users, family.assignment[users], rows_only=True),
      seqs,
      tokenizer,
      opts,
      family.trainer.eval_batch,
      family.name,
      groups_U=family.assignment,
      share=family.trainer.ranking_share(),
    )
  )
  cfg = family.trainer.cfg.model
  gen_seqs, gen_users, assignment = drawn.seqs, drawn.users, drawn.assignment(family.assignment)
  greedy = generate(
    cfg,
    family.params,
    gen_seqs,
    assignment,
    gen_users,
    generation_sampling(seqs, tokenizer, opts),
    seed=opts.seed,
    mix=family.trainer.mix,
  )
  generated = [_page_tokens(g, tokenizer) for g in greedy]
  actual = [_page_tokens(gen_seqs.target(int(v)), tokenizer) for v in gen_users]
  for name, fn in _GENERATED:
    out[name] = fn(generated, actual)
  if tokenizer.outcome_types:
    probs = outcome_probabilities(
      cfg, family.params, gen_seqs, assignment, gen_users, tokenizer, opts, family.trainer.mix
    )
    out["outcomes"] = {}
    for outcome, prob in probs.items():
      token = tokenizer.outcome_id(outcome)
      label = np.array([token in gen_seqs.target(int(v)) for v in gen_users])
      predicted = np.array([token in g for g in greedy])
      out["outcomes"][outcome] = {
        "auc": M.outcome_auc(prob, label),
        "f1": M.outcome_f1(predicted, label),
        "positives": int(label.sum()),
        "users": int(len(label)),
      }
  return out, mixture_U


def outcome_probabilities(
  cfg,
  params,
  seqs: UserSequences,
  assignment_U: np.ndarray,
  users: np.ndarray,
  tokenizer: PageTokenizer,
  opts: EvalOptions,
  mix=None,
) -> dict[str, np.ndarray]:
  """{outcome type: [len(users)] P(the outcome's token in the user's next --max_new tokens)}, estimated from
  opts.outcome_samples continuations sampled at temperature 1 from each user's model (`assignment_U`; `mix`:
  see generate)."""
  samples = [
    generate(
      cfg,
      params,
      seqs,
      assignment_U,
      users,
      Sampling(max_new=opts.max_new, temperature=1.0),
      seed=opts.seed + 1 + i,
      mix=mix,
    )
    for i in range(opts.outcome_samples)
  ]
  return {
    outcome: np.mean([[tokenizer.outcome_id(outcome) in g for g in sample] for sample in samples], axis=0)
    for outcome in tokenizer.outcome_types
  }


def group_batches(groups_U: np.ndarray, lengths_U: np.ndarray, batch: int) -> list[np.ndarray]:
  """Users in batches of at most `batch`, each of one group (e.g. cluster), by history length within a group:
  a batch's prompts are as wide as its longest (Trainer.next_logprobs), so similar lengths pad little."""
  order = np.lexsort((lengths_U, groups_U))
  bounds = np.flatnonzero(np.diff(groups_U[order])) + 1
  return [b for g in np.split(order, bounds) if len(g) for b in np.array_split(g, -(-len(g) // batch))]


def own_batches(groups_U: np.ndarray, lengths_U: np.ndarray, batch: int) -> list[np.ndarray]:
  """--own_users: `group_batches` of this process's users, with empty batches added so that every process has as
  many of each group as the process with the most: batch i is of one group on every process (every process must
  call this at the same point)."""
  n_groups = hosts.most(int(groups_U.max(initial=-1)) + 1)
  batches = group_batches(groups_U, lengths_U, batch)
  by_group = [[b for b in batches if groups_U[b[0]] == g] for g in range(n_groups)]
  (every,) = hosts.every_user(np.array([len(b) for b in by_group], np.int64))
  most_G = every.reshape(-1, n_groups).max(axis=0) if n_groups else []
  empty = np.zeros(0, np.int64)
  return [b for g, mine in enumerate(by_group) for b in mine + [empty] * int(most_G[g] - len(mine))]


def unknown_targets(seqs: UserSequences, users_U: np.ndarray | None = None) -> int:
  """How many of the users (a mask or indices; all when None) have a ranked target page that no model knows."""
  unknown_U = seqs.tokens[first_page_index(seqs)] == UNK
  return int(unknown_U.sum() if users_U is None else unknown_U[users_U].sum())


def rank_next_pages(
  logprobs_fn,
  seqs: UserSequences,
  tokenizer: PageTokenizer,
  opts: EvalOptions,
  batch: int,
  label: str,
  groups_U: np.ndarray | None = None,
  share: tuple[hosts.Groups, slice] | None = None,
) -> dict:
  """Next-page HR@1/5/10, NDCG@10, MRR: full ranking over pages, and against sampled negatives; and the
  catalogue-renormalised NLL of the true page (M.catalogue_nll), what an LLM baseline is compared on.

  A target page that never appeared in training (UNK) counts as a miss for every model, as in SASRec's
  protocol, where such an item keeps its untrained embedding; `unknown_targets` counts those users.

  `logprobs_fn(users)` gets batches of users of one group (e.g. cluster) each, when groups are given.
  The negatives depend on (opts.seed, seqs) only, never on the batching, so every model and baseline
  ranks each user's true page against the same pages.

  `share` (groups of processes, rows): every process goes through the same batches, but `logprobs_fn(users)` gives
  only the log-probabilities of `users[rows]`, this process's rows of the batch (Trainer.next_logprobs with
  rows_only), and each group ranks only those users; their metrics, a few floats a user, are gathered at the end.
  With --own_users, each process goes through batches of its own users as large as its rows (`own_batches`), and
  `logprobs_fn(users)` gives all of theirs; nothing is gathered (the users are this process's).
  """
  groups, rows = share if share is not None else (hosts.Groups(), slice(None))
  own = share is not None and hosts.own_users()
  candidate_V = np.arange(tokenizer.vocab_size) >= tokenizer.num_specials
  true_U = seqs.tokens[first_page_index(seqs)]
  neg_UxQ, ok_U = M.sample_negatives(
    seqs, candidate_V, opts.negatives, opts.seed, exclude_U=true_U, by_id=opts.by_id or hosts.own_users()
  )
  groups_U = np.zeros(seqs.num_users, np.int64) if groups_U is None else np.asarray(groups_U)
  if own:
    batches, rows = own_batches(groups_U, seqs.history_lengths, rows.stop - rows.start), slice(None)
  else:
    batches = group_batches(groups_U, seqs.history_lengths, batch)
  full_keys, sampled_keys = ("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr"), ("hr@10", "ndcg@10")
  keys = (*full_keys, *(f"{k}_sampled" for k in sampled_keys), "catalogue_nll")
  out = {key: np.full(seqs.num_users, np.nan) for key in keys}
  ranked = []  # the users this group ranked
  progress = Progress(len(batches), f"{label} ranking", every=10)
  for i, users in enumerate(batches):
    logp_BxV = logprobs_fn(users)
    mine = users[rows]
    ranked.append(mine)
    if len(mine):
      full = M.ranking_metrics(logp_BxV, true_U[mine], candidate_V, unknown=UNK)
      sampled = M.negatives_ranking_metrics(logp_BxV, true_U[mine], neg_UxQ[mine], ok_U[mine], candidate_V, unknown=UNK)
      for k in full_keys:
        out[k][mine] = full[k]
      for k in sampled_keys:
        out[f"{k}_sampled"][mine] = sampled[k]
      out["catalogue_nll"][mine] = M.catalogue_nll(logp_BxV, true_U[mine], candidate_V)
    progress.update(i + 1)
  progress.close()
  if groups.count > 1 and not own:  # a few floats a user, in pieces (hosts.Groups.place)
    ranked = np.concatenate(ranked) if ranked else np.zeros(0, np.int64)
    groups.place(ranked, [out[key] for key in keys], *(out[key][ranked] for key in keys))
  return out


def _baseline_metrics(
  model,
  seqs: UserSequences,
  tokenizer: PageTokenizer,
  opts: EvalOptions,
  batch: int,
  name: str,
  share: tuple[hosts.Groups, slice] | None = None,
) -> dict:
  """A host-side baseline's per-user metrics; with `share`, each group of processes ranks its rows' users only."""
  model.fit(seqs, tokenizer.vocab_size)
  nll_U, tokens_U = model.target_nll(seqs)
  out = {"nll": nll_U / np.maximum(tokens_U, 1)}
  rows = slice(None) if share is None or hosts.own_users() else share[1]

  def logprobs(users):
    if not len(users[rows]):
      return np.zeros((0, tokenizer.vocab_size))
    subset = seqs.subset(users[rows])
    return model.next_token_logprobs(subset, at_U=first_page_index(subset))

  out.update(rank_next_pages(logprobs, seqs, tokenizer, opts, batch, name, share=share))
  return out


def evaluate(
  families: dict[str, LMFamily],
  seqs: UserSequences,
  tokenizer: PageTokenizer,
  workdir: Path,
  evaluated_U: np.ndarray | None = None,
  opts: EvalOptions = EvalOptions(),
  extra: dict | None = None,
  rounds: list[dict] | None = None,
  llms: dict | None = None,
) -> dict:
  """Writes eval.json and report.md (with figures) into `workdir`; returns the eval.json content.

  `llms`: {name: a trained llm.baseline.LLMBaseline}, scored on the same users and positions, and compared with
  every page LM by the paired bootstrap (eval.json's "llm").

  With --own_users each process scores and ranks its own users, and the per-user figures (a few scalars a user) are
  then brought together, every process's users one after the other, for the summaries and the bootstrap."""
  start = time.perf_counter()
  u = seqs.num_users
  evaluated_U = np.ones(u, bool) if evaluated_U is None else evaluated_U
  drawn = draw_users(seqs, evaluated_U, opts)
  per_user, outcomes, hetlm_mixture_U, generated = {}, {}, None, {}
  k = families["hetlm"].trainer.k if "hetlm" in families else 1
  interrupt.at_phase("evaluate")
  for name, family in families.items():
    logging.info("evaluating %s", name)
    # HeTLM's mixture likelihood: the target under each model weighted by its posterior given the user's history.
    per_user[name], mixture_U = _lm_metrics(family, seqs, tokenizer, opts, drawn, name == "hetlm" and k > 1)
    generated[name] = {metric: per_user[name].pop(metric) for metric, _ in _GENERATED}
    evaluated(name)
    if "outcomes" in per_user[name]:
      outcomes[name] = per_user[name].pop("outcomes")
    if mixture_U is not None:
      hetlm_mixture_U = mixture_U
  if hetlm_mixture_U is not None:
    per_user["hetlm_mixture"] = {"nll": hetlm_mixture_U}
  mixture = MarkovMixture(max(k, 2), seed=opts.seed, by_id=opts.by_id)
  baselines = {"popularity": Popularity(), "markov": Markov(), "markov_mixture": mixture}
  trainer = next(iter(families.values())).trainer if families else None
  batch = trainer.eval_batch if trainer is not None else 512
  share = None if trainer is None else trainer.ranking_share()
  for name, model in baselines.items():
    logging.info("evaluating %s", name)
    per_user[name] = _baseline_metrics(model, seqs, tokenizer, opts, batch, name, share)
    evaluated(name)
  llm_records = {}
  for name, llm in (llms or {}).items():
    logging.info("evaluating %s", name)
    per_user[name], context_U, ranked = llm.per_user(seqs, evaluated_U, first_page_index(seqs), opts.seed)
    llm_records[name] = llm.record(context_U, ranked)
    evaluated(name)
  hetlm_U = families["hetlm"].assignment if "hetlm" in families else None
  per_user, evaluated_U, hetlm_U, unknown = every_user_figures(
    per_user, evaluated_U, hetlm_U, unknown_targets(seqs, evaluated_U)
  )
  for name, metrics in generated.items():  # NaN for the users not generated for
    for metric, values in metrics.items():
      per_user[name][metric] = np.full(len(evaluated_U), np.nan)
      per_user[name][metric][drawn.at] = values

  report = {
    "models": summaries(per_user, evaluated_U),
    "n_users": int(evaluated_U.sum()),
    "generated_users": int(len(drawn.users)),
    "n_pages": tokenizer.vocab_size - tokenizer.num_specials,
    "negatives": opts.negatives,
    "unknown_targets": unknown,
    **(extra or {}),
  }
  if outcomes:
    report["outcomes"] = outcomes
  if "hetlm" in per_user:
    report["bootstrap"] = hetlm_comparisons(per_user, (*_ALIGNMENT, "nll", "hr@10", "ndcg@10"), opts, evaluated_U)
    report["clusters"] = per_cluster(per_user, hetlm_U, k, evaluated_U)
  if llm_records:
    report["llm"] = llm_comparisons(per_user, llm_records, opts, evaluated_U)
  report["eval_s"] = time.perf_counter() - start
  write_outputs(workdir, report, {name: m["nll"][evaluated_U] for name, m in per_user.items()}, rounds)
  return report


def every_user_figures(per_user: dict[str, dict], evaluated_U: np.ndarray, hetlm_U: np.ndarray | None, unknown: int):
  """The per-user figures, the evaluated mask, HeTLM's assignment and the count of unknown targets, of every user:
  as they are, or with --own_users every process's brought together (each process's users one after the other)."""
  if not hosts.own_users():
    return per_user, evaluated_U, hetlm_U, unknown
  names = [(name, metric) for name, metrics in per_user.items() for metric in metrics]
  mine = [per_user[name][metric] for name, metric in names]
  extra = [] if hetlm_U is None else [hetlm_U]
  every = hosts.every_user(evaluated_U, *extra, *mine)
  together = {name: {} for name in per_user}
  for (name, metric), values in zip(names, every[1 + len(extra) :], strict=True):
    together[name][metric] = values
  (unknown,) = hosts.total(np.array(unknown))
  return together, every[0], every[1] if extra else None, int(unknown)


def summaries(per_user: dict[str, dict], users_U=slice(None)) -> dict:
  """{model: {metric: summary}} over `users_U` (a mask; default all), the perplexity added from the NLL."""
  for metrics in per_user.values():
    metrics["perplexity"] = np.exp(metrics["nll"])
  return {
    name: {metric: M.summarize(values[users_U]) for metric, values in metrics.items()}
    for name, metrics in per_user.items()
  }


def hetlm_comparisons(per_user: dict[str, dict], metrics: tuple[str, ...], opts: EvalOptions, users_U=slice(None)):
  """{"hetlm-OTHER": {metric: paired bootstrap of HeTLM minus OTHER}} for each single LM, over `users_U`."""
  return {
    f"hetlm-{other}": {
      metric: M.paired_bootstrap(
        per_user["hetlm"][metric][users_U], per_user[other][metric][users_U], opts.bootstrap, opts.seed
      )
      for metric in metrics
    }
    for other in ("single", "single_ft", "single_matched")
    if other in per_user
  }


LLM_METRICS = ("nll", "catalogue_nll", "hr@10", "ndcg@10")


def llm_comparisons(per_user: dict[str, dict], records: dict[str, dict], opts: EvalOptions, users_U) -> dict:
  """{llm: its record, and "vs": {page LM: {metric: paired bootstrap of the page LM minus the LLM}}}: every page LM
  (each family and the HeTLM mixture) against each LLM, on the users both have a figure for (the ranking metrics:
  the LLM's ranked draw)."""
  page_lms = [name for name in per_user if name not in records and name in (*LM_NAMES, "hetlm_mixture")]
  out = {}
  for name, record in records.items():
    vs = {}
    for lm in page_lms:
      vs[lm] = {
        metric: M.paired_bootstrap(
          per_user[lm][metric][users_U], per_user[name][metric][users_U], opts.bootstrap, opts.seed
        )
        for metric in LLM_METRICS
        if metric in per_user[lm]
      }
    out[name] = {**record, "vs": vs}
  return out


def per_cluster(per_user: dict[str, dict], cluster_U: np.ndarray, k: int, users_U: np.ndarray | None = None):
  """Each HeTLM cluster's users (of `users_U`, a mask; default all) and every model's mean NLL over them."""
  rows = []
  for c in range(k):
    mine_U = (cluster_U == c) if users_U is None else (cluster_U == c) & users_U
    nll = {f"{name}_nll": float(np.nanmean(m["nll"][mine_U])) for name, m in per_user.items()} if mine_U.any() else {}
    rows.append({"cluster": c, "users": int(mine_U.sum()), **nll})
  return rows


UNCHANGED = "eval.json and report.md are as they were, and every model is checkpointed (the evaluation runs again)"


def evaluated(name: str) -> None:
  """A safe point of the evaluation, once model `name` is scored (every process is there)."""
  interrupt.safe_point(f"evaluating, after {name}", UNCHANGED)


def write_outputs(workdir: Path, report: dict, nll: dict[str, np.ndarray], rounds: list[dict] | None) -> None:
  """eval.json, report.md and its pictures, each written whole (files.py); in a multi-process job, by process 0
  alone. A stop asked for before this point writes none of them; once writing, they are all written."""
  interrupt.at_phase("report")
  interrupt.safe_point("before writing the report", UNCHANGED)
  if not hosts.is_primary():
    return
  _write_json(workdir / EVAL_FILE, report)
  from hetlm_jax.eval.report import write_report  # matplotlib stays optional

  write_report(workdir, report, nll, rounds or [])


def _finite(x):
  """NaN (a metric that applies to nobody, e.g. AUC with one class) becomes null: strict JSON."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return None if np.isnan(x) else float(x)
  return x


def _write_json(path: Path, content: dict) -> None:
  replace_text(path, json.dumps(_finite(content), indent=2, allow_nan=False, default=float) + "\n")
