"""The trainer: K stacked models, a step loop fed ahead and read every few steps, scoring of every user by every
model."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hetlm_jax import hosts, interrupt
from hetlm_jax.config import Config
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.errors import HetlmError
from hetlm_jax.train.batches import ClusterBatches, ScoringBatches, ShardedBatches, add_by_user, prompts, scored_users
from hetlm_jax.train.metrics import MetricsLog, Progress
from hetlm_jax.train.prefetch import Prefetcher
from hetlm_jax.train.split import model_params, partition
from hetlm_jax.train.state import (
  TrainState,
  abstract_state,
  cluster_spec,
  cold_lr,
  create_state,
  make_mesh,
  make_optimizer,
  split_state,
  state_shardings,
)
from hetlm_jax.train.step import make_hidden_fn, make_next_logprobs_fn, make_score_fn, make_train_step


def _warm_state(tx, k, spec, n_layers, round_lr, single_params) -> TrainState:
  parts = partition(spec, n_layers, model_params(single_params, 0))
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), parts["cluster"])
  return split_state(tx, {"shared": parts["shared"], "cluster": stacked}, round_lr)


class Trainer:
  """Compiled step and scoring pass for K stacked models on one mesh; shapes fixed for the whole run."""

  def __init__(self, cfg: Config, k: int, devices=None, prox: float = 0.0):
    self.cfg, self.k = cfg, k
    self.mesh = make_mesh(cfg, k, devices)
    self.tx = make_optimizer(cfg)
    self.abstract = abstract_state(cfg, self.tx, self.mesh, k)
    self.train_step = make_train_step(cfg, self.tx, self.mesh, self.abstract, prox)
    self.anchor = None  # with prox > 0: one model's parameters that every model is pulled toward
    self.mix = None  # --mix_init: (anchor, lam_K) on the devices; scoring and decoding then use the mixtures
    n_data = self.mesh.shape["data"]
    self.eval_batch = -(-cfg.train.eval_batch_size // n_data) * n_data
    self.host_wait_s = 0.0  # time train_round waited for a batch, over every call
    self._stepped = False  # the first metrics window's time includes compiling the step
    self._window = []  # metrics of the steps since the last record, still on the devices
    slots = ScoringBatches.max_windows(cfg.model.context + 1, self.eval_batch)
    self.score_batch = make_score_fn(cfg, self.mesh, self.abstract, slots)
    self.score_pages_batch = make_score_fn(cfg, self.mesh, self.abstract, slots, pages_only=True)
    self.hidden_batch = make_hidden_fn(cfg, self.mesh, self.abstract)
    self.next_logprobs_batch, self.next_logprobs_model = make_next_logprobs_fn(cfg, self.mesh, self.abstract)
    shardings = state_shardings(self.mesh, self.abstract)
    take = lambda source_K: lambda tree: {**tree, "cluster": jax.tree.map(lambda x: x[source_K], tree["cluster"])}
    self._gather = jax.jit(
      lambda state, source_K: state.replace(
        params=take(source_K)(state.params), opt_state=take(source_K)(state.opt_state)
      ),
      out_shardings=shardings,
      donate_argnums=0,
    )
    self._warm = jax.jit(
      functools.partial(_warm_state, self.tx, k, cluster_spec(cfg, k), cfg.model.n_layers, cold_lr(cfg.train)),
      out_shardings=shardings,
    )
    self._rows = NamedSharding(self.mesh, P("data"))
    self._replicated = NamedSharding(self.mesh, P())
    self._unmixed = (self.score_batch, self.score_pages_batch, self.next_logprobs_batch, self.next_logprobs_model)
    self._mixed = None  # their --mix_init forms, compiled when first needed

  def init_state(self) -> TrainState:
    """K freshly initialised models and optimizer states, laid out on the mesh."""
    return create_state(self.cfg, self.tx, self.mesh, self.k)

  def start_round(self, state: TrainState, steps: int, round_lr=None) -> TrainState:
    """A new round of `steps` steps from here, its rates (start, peak, end) `round_lr` (default: cold_lr)."""
    put = lambda value: hosts.put(value, self.abstract.round_start.sharding)
    round_lr = cold_lr(self.cfg.train) if round_lr is None else np.asarray(round_lr, np.float32)
    return state.replace(
      round_start=put(np.int32(state.step)), round_steps=put(np.int32(steps)), round_lr=put(round_lr)
    )

  def copy_models(self, state: TrainState, source_K: np.ndarray) -> TrainState:
    """Model c takes the own parameters and optimizer state of model source_K[c] (re-seeding a cluster)."""
    return self._gather(state, hosts.put(np.asarray(source_K, np.int32), self._replicated))

  def anchor_from(self, single_params):
    """One model's full parameters (model 0 of a trained family, e.g. the init LM), replicated: the anchor
    that --prox pulls toward."""
    return jax.jit(lambda p: model_params(p, 0), out_shardings=self._replicated)(single_params)

  def anchor_shape(self):
    """The abstract arrays of one model's full parameters, replicated (what `anchor_from` gives): a
    checkpoint's anchor restores onto them."""
    one = jax.eval_shape(lambda p: model_params(p, 0), self.abstract.params)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated), one)

  def set_mix(self, anchor, lam_K) -> None:
    """--mix_init: from now on model k predicts lam_k p_k + (1 - lam_k) p_anchor wherever this trainer scores
    (score, next_logprobs; `generate` takes `mix`); `lam_K` None goes back to the K models alone."""
    if lam_K is None:
      self.mix = None
      self.score_batch, self.score_pages_batch, self.next_logprobs_batch, self.next_logprobs_model = self._unmixed
      return
    lam = hosts.put(np.asarray(lam_K, np.float32), self._replicated)
    self.mix = (anchor, lam)
    if self._mixed is None:
      slots = ScoringBatches.max_windows(self.cfg.model.context + 1, self.eval_batch)
      self._mixed = (
        make_score_fn(self.cfg, self.mesh, self.abstract, slots, mixed=True),
        make_score_fn(self.cfg, self.mesh, self.abstract, slots, pages_only=True, mixed=True),
        *make_next_logprobs_fn(self.cfg, self.mesh, self.abstract, mixed=True),
      )
    bind = lambda fn: lambda params, *args: fn(params, anchor, lam, *args)
    self.score_batch, self.score_pages_batch, self.next_logprobs_batch, self.next_logprobs_model = map(
      bind, self._mixed
    )

  def warm_state(self, single_params) -> TrainState:
    """Every one of the K models starts from the same single-model parameters (a K=1 family), with fresh
    moments."""
    return self._warm(single_params)

  def train_round(
    self,
    state: TrainState,
    batches: ClusterBatches | ShardedBatches,
    log: MetricsLog | None = None,
    on_step=None,
    label: str = "train",
    until: int | None = None,
    record: dict | None = None,
  ) -> TrainState:
    """Runs the current round up to step `until` of the round (default: its end), e.g. one epoch.

    Batches come from a background thread (`--prefetch`). Metrics stay on the device and are read every
    `--log_every` steps, at least every 10 s (the progress line), and at the end; each read logs the
    window since the last one, with `record` (e.g. model, round) in its metrics.jsonl record.
    `on_step(state, step)` is called after each dispatched step but the last, with the global step
    counted on the host, so the loop never waits on the device.
    """
    round_start = int(state.round_start)
    first = int(state.step) - round_start
    until = batches.steps if until is None else until
    progress = Progress(until, label, every=1, initial=first)
    # This process builds only its block of each global batch (its rows, and its clusters if K is sharded).
    sharding, shape = self.train_step.batch_sharding, (batches.k, batches.batch_size, batches.width)
    clusters, rows, _ = self.batch_block(batches.k)
    put = functools.partial(hosts.put_block, sharding=sharding, shape=shape)

    def make(s):
      tokens, segments, weights = batches.batch(s, clusters, rows)
      return tokens, segments, weights * np.nan if interrupt.nan_at(round_start + s + 1) else weights

    feed = Prefetcher(make, put, first, until, self.cfg.train.prefetch)
    self._window, window_start = [], time.perf_counter()
    shown = window_start
    try:
      for done, batch in enumerate(feed, start=first + 1):
        state, metrics = self.train_step(state, *batch, anchor=self.anchor)
        self._window.append(metrics)
        interrupt.after_step(round_start + done)
        boundary = done % self.cfg.train.log_every == 0 or done == until
        if boundary or time.perf_counter() - shown >= 10:  # a metrics record, or only the progress line
          shown = self._report(self._window, log if boundary else None, progress, window_start, done, record)
          if boundary:
            self._window, window_start = [], shown
        if on_step is not None and done < until:
          on_step(state, round_start + done)
    finally:
      feed.close()
      self.host_wait_s += feed.wait_s
    progress.close()
    return state

  def batch_block(self, k: int) -> tuple[slice, ...]:
    """(clusters, rows, tokens): the block of every global training batch [K, batch_size, T+1] that this
    process's devices hold, and so the only part of it this process builds (hosts.local_block)."""
    shape = (k, self.cfg.train.batch_size, self.cfg.model.context + 1)
    return hosts.local_block(self.train_step.batch_sharding, shape)

  def _report(self, window: list, log, progress, window_start: float, done: int, record: dict | None) -> float:
    """Reads the window's metrics (waiting for its last step), shows them and, given a log, writes them as
    one record; returns the time."""
    m = hosts.fetch(window)
    if log is not None:  # at a step every process reaches: in a multi-process job they all stop there
      self._check_finite(m)
    now = time.perf_counter()
    stack = lambda key: np.stack([step[key] for step in m])  # [J, K]: the window's steps by models
    weight_JxK, nll_JxK = stack("tokens"), stack("nll_sum")
    real = float(stack("real_tokens").sum())
    loss = float(nll_JxK.sum() / max(weight_JxK.sum(), 1e-9))
    tok_s = real / max(now - window_start, 1e-9)
    compiling = "" if self._stepped else " (includes compiling the step)"
    self._stepped = True
    progress.update(done, f"loss {loss:.3f} ppl {np.exp(min(loss, 50)):.2f} {tok_s:,.0f} tok/s{compiling}")
    if log is not None:
      # Per model, over the window's steps where it had real tokens (None: only padding in the window).
      had_K = weight_JxK.sum(0) > 0
      per_model = np.where(had_K, nll_JxK.sum(0) / np.maximum(weight_JxK.sum(0), 1e-9), np.nan)
      grad_K = np.where(
        had_K, (stack("grad_norm") * (weight_JxK > 0)).sum(0) / np.maximum((weight_JxK > 0).sum(0), 1), np.nan
      )
      none_if_nan = lambda a: [None if np.isnan(x) else float(x) for x in a]
      log.write(
        {
          "kind": "train",
          **(record or {}),
          "step": int(m[-1]["step"][0]),
          "step_in_round": done,
          "steps": len(m),
          "loss": loss,
          "perplexity": float(np.exp(min(loss, 50))),
          "loss_per_model": none_if_nan(per_model),
          "grad_norm": none_if_nan(grad_K),
          "learning_rate": float(m[-1]["learning_rate"][0]),
          "tokens_per_s": tok_s,
          "step_time_s": (now - window_start) / len(m),
        }
      )
    return now

  def check_finite(self) -> None:
    """Raises NonFiniteLoss if a step since the last metrics record had a NaN or infinite loss (waits for
    them): called before a checkpoint, so none holds what such a step did."""
    self._check_finite(hosts.fetch(self._window))

  @staticmethod
  def _check_finite(window: list) -> None:
    for metrics in window:
      if not np.isfinite(metrics["nll_sum"]).all():
        raise interrupt.NonFiniteLoss(
          f"the training loss is {float(metrics['nll_sum'].sum())} at step {int(metrics['step'][0])}"
        )

  def scoring_share(self) -> tuple[int, int, slice]:
    """(g, G, rows): a scoring batch's rows are cut into G blocks, one per group of processes whose devices hold the
    same rows, and this process's group g fills `rows` of them. Without a mesh over several hosts' rows: (0, 1,
    every row)."""
    if jax.process_count() == 1:
      return 0, 1, slice(0, self.eval_batch)
    rows = hosts.local_block(self._rows, (self.eval_batch,))[0]
    size = rows.stop - rows.start
    g, groups = rows.start // size, self.eval_batch // size
    if hosts.own_users() and (g, groups) != hosts.share():
      raise HetlmError(
        f"--own_users: process {hosts.share()[0]} of {hosts.share()[1]} holds rows {rows.start}-{rows.stop} of the "
        f"{self.eval_batch} of a batch, group {g} of {groups}; each process must hold its own block of rows, in "
        "process order (one process per host, every device on the batch's rows)"
      )
    return g, groups, rows

  def _scoring_batches(self, seqs: UserSequences, part: str, pages_only: bool = False):
    """This process's group's users of `seqs` (a contiguous G-th of them; with --own_users, all of this process's),
    their ScoringBatches on its rows, the number of batches every group runs (the most any has) and the group's
    first result slot."""
    g, groups, rows = self.scoring_share()
    users = np.arange(seqs.num_users) if hosts.own_users() else np.array_split(np.arange(seqs.num_users), groups)[g]
    mine = seqs if groups == 1 or hosts.own_users() else seqs.subset(users)
    batches = ScoringBatches(mine, part, self.cfg.model.context + 1, rows.stop - rows.start, pages_only)
    count = batches.num_batches if groups == 1 else hosts.most(batches.num_batches)
    return users, batches, count, g * ScoringBatches.max_windows(self.cfg.model.context + 1, rows.stop - rows.start)

  def _put_rows(self, *blocks: np.ndarray) -> tuple:
    """Global row-sharded arrays [eval_batch, ...] from this process's rows of each."""
    return tuple(hosts.put_block((b,), self._rows, (self.eval_batch, *b.shape[1:]))[0] for b in blocks)

  def gather_users(self, users: np.ndarray, num_users: int, *results: np.ndarray) -> list[np.ndarray]:
    """The whole [..., U] `results` from every group's [..., users] (the last axis per user, `users` its indices in
    `seqs`, as `score_share` and `embed_share` give them), as every process holds them (`hosts.Groups.place`); one
    group: as they are. With --own_users, `seqs` is this process's users, the group's share: as they are."""
    g, groups, _ = self.scoring_share()
    if groups == 1 or hosts.own_users():
      return list(results)
    whole = [np.zeros((*r.shape[:-1], num_users), r.dtype) for r in results]
    self.groups().place(users, whole, *results)
    return whole

  def groups(self) -> hosts.Groups:
    """The groups of processes of `scoring_share`, for results of each group's share (sums, each group once)."""
    g, groups, _ = self.scoring_share()
    return hosts.Groups(g, groups)

  def ranking_share(self) -> tuple[hosts.Groups, slice]:
    """(the groups, this process's rows of a batch): what `rank_next_pages` needs to rank each process's rows only
    (with `next_logprobs(rows_only=True)`)."""
    return self.groups(), self.scoring_share()[2]

  def score(
    self, params, seqs: UserSequences, part: str, label: str = "score", pages_only: bool = False
  ) -> tuple[np.ndarray, np.ndarray]:
    """NLL sums [K, U] of each user's history ('history') or held-out target ('target') under every model,
    and the number of scored tokens [U]. `pages_only`: only page tokens are scored, each given that the
    sequence goes on (no end marker: BOS and EOS are neither scored nor predicted).

    With the batch's rows on several hosts, each group of processes lays out and scores only its own G-th of the
    users on its own rows (host work O(U / G) a process; `score_share`), and the per-user sums are gathered at the
    end."""
    users, nll_KxR, tokens_R = self.score_share(params, seqs, part, label, pages_only)
    return tuple(self.gather_users(users, seqs.num_users, nll_KxR, tokens_R))

  def score_share(
    self, params, seqs: UserSequences, part: str, label: str = "score", pages_only: bool = False
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`score` of this process's group's users only, not gathered: (their indices in `seqs`, NLL sums [K, R],
    scored tokens [R]); what every process needs of them goes through `groups` or `gather_users`."""
    users, batches, count, first_slot = self._scoring_batches(seqs, part, pages_only)
    score_batch = self.score_pages_batch if pages_only else self.score_batch
    progress = Progress(count, label, every=10)
    nll_KxR = np.zeros((self.k, len(users)))
    tokens_R = np.zeros(len(users), np.int64)
    pending = None
    for i in range(count):
      tokens, segments, mask, owner = batches.batch(i)
      users_r, local_BxT, count_r = scored_users(mask, owner)
      local_BxT = np.where(local_BxT >= 0, local_BxT + first_slot, 0).astype(np.int32)
      sums_Kxr = score_batch(params, *self._put_rows(tokens, segments, mask, local_BxT))
      if pending is not None:  # add batch i-1 while batch i runs
        self._add_scores(nll_KxR, *pending)
      pending = (sums_Kxr, users_r, first_slot)
      tokens_R[users_r] += count_r
      progress.update(i + 1)
    if pending is not None:
      self._add_scores(nll_KxR, *pending)
    progress.close()
    return users, nll_KxR, tokens_R

  @staticmethod
  def _add_scores(nll_KxU, sums_KxR, users_R, first_slot):
    nll_KxU[:, users_R] += np.asarray(hosts.fetch(sums_KxR))[:, first_slot : first_slot + len(users_R)]

  def embed(self, params, seqs: UserSequences) -> np.ndarray:
    """Each user's mean final hidden state over their history window under every model: [K, U, D] (each group of
    processes adds up its own users, as `score` does, and the means are gathered)."""
    users, means_UxKD = self.embed_share(params, seqs)
    (means_KDxU,) = self.gather_users(users, seqs.num_users, means_UxKD.T)
    return means_KDxU.T.reshape(seqs.num_users, self.k, self.cfg.model.d_model).transpose(1, 0, 2)

  def embed_share(self, params, seqs: UserSequences) -> tuple[np.ndarray, np.ndarray]:
    """`embed` of this process's group's users only, not gathered: (their indices in `seqs`, [U_g, K x D] means);
    `gather_users` brings per-user results of it to every process."""
    users, batches, count, _ = self._scoring_batches(seqs, "history")
    rows = self.scoring_share()[2]
    k, d = self.k, self.cfg.model.d_model
    sums_UxKD = np.zeros((len(users), k * d))
    for i in range(count):
      tokens, segments, _, owner = batches.batch(i)
      real = owner >= 0
      h_KxNxD = np.asarray(hosts.fetch(self.hidden_batch(params, *self._put_rows(tokens, segments))))
      h_KxNxD = h_KxNxD[:, rows][:, real]
      add_by_user(sums_UxKD, owner[real], h_KxNxD.transpose(1, 0, 2).reshape(-1, k * d))
    return users, sums_UxKD / np.maximum(batches.length_U, 1)[:, None]

  def next_logprobs(
    self,
    params,
    seqs: UserSequences,
    users_B: np.ndarray,
    cluster_B: np.ndarray | None = None,
    rows_only: bool = False,
  ) -> np.ndarray:
    """[B, V] log-distribution of each user's first target token (after BOS for a new session) under the
    model of `cluster_B`, or [K, B, V] under every model when cluster_B is None; the batch is padded to the
    eval batch. A batch of one cluster's users runs only that cluster's model. Prompts are only as wide as the
    batch's longest needs, rounded up to a power of two (at least 8, at most --context): browsing histories are
    short, and a few widths keep the compiled shapes few.

    `rows_only`: only the users in this process's rows of the batch (`users_B[scoring_share()[2]]`), read from
    its own devices, so no process receives every row's V log-probabilities. With --own_users, `users_B` are this
    process's users (of its `seqs`), at most its rows' number, and fill its rows alone: every process calls this
    together, each with its own users (or none)."""
    b, n, context = self.eval_batch, len(users_B), self.cfg.model.context
    rows = self.scoring_share()[2] if rows_only else slice(0, b)
    own = rows_only and hosts.own_users()
    first = rows.start if own else 0  # where users_B start in the batch
    mine = slice(rows.start, max(rows.start, min(rows.stop, first + n)))  # the batch's users in those rows
    padded = np.full(b, -1)
    padded[first : first + n] = users_B
    left_BxT, pad_B = prompts(seqs, padded, context)
    longest = int(context - pad_B[first : first + max(n, 1)].min())
    single = cluster_B is not None and n and (np.asarray(cluster_B) == cluster_B[0]).all()
    if own:  # one all-gather: the widest prompt, and whether every process's users (if any) are of one cluster
      widest_P, every = hosts.each([longest, cluster_B[0] if single else -1 if n else -2]).T
      longest = int(widest_P.max())
      single = cluster_B is not None and (every >= 0).any() and (every[every != -2] == every.max()).all()
      cluster_B = cluster_B if n or not single else np.array([every.max()])
    width = min(context, max(8, 1 << (longest - 1).bit_length()))
    left_BxT, pad_B = left_BxT[:, context - width :], (pad_B - (context - width)).astype(np.int32)
    width = left_BxT.shape[1]
    right_BxT = np.take_along_axis(left_BxT, (np.arange(width)[None, :] + pad_B[:, None]) % width, axis=1)
    last_B = np.maximum(width - 1 - pad_B, 0).astype(np.int32)
    if single:
      model = hosts.put(np.int32(cluster_B[0]), self._replicated)
      out_BxV = self.next_logprobs_model(params, model, *hosts.put_all((right_BxT, last_B), self._rows))
      return _rows_of(out_BxV, mine, 0, rows_only)
    out_KxBxV = self.next_logprobs_batch(params, *hosts.put_all((right_BxT, last_B), self._rows))
    out_KxBxV = _rows_of(out_KxBxV, mine, 1, rows_only)
    if cluster_B is None:
      return out_KxBxV
    return out_KxBxV[np.asarray(cluster_B)[mine.start - first : mine.stop - first], np.arange(mine.stop - mine.start)]


def _rows_of(x: jax.Array, rows: slice, axis: int, local: bool) -> np.ndarray:
  """Rows `rows` (along `axis`) of global array `x`, whole along every other axis. `local` (every process asks for
  the rows its own devices hold, `Trainer.scoring_share`): read from its own devices when they hold every other axis
  whole; else (and without `local`) gathered. The choice depends on the mesh alone, so every process makes the same
  one, as a gather needs."""
  if local:
    block, values = hosts.fetch_local(x)
    if all(b == slice(0, size) for d, (b, size) in enumerate(zip(block, x.shape)) if d != axis):
      if not block[axis].start <= rows.start <= rows.stop <= block[axis].stop:
        raise RuntimeError(f"rows {rows} asked of a process whose devices hold {block[axis]}")
      at = [slice(None)] * x.ndim
      at[axis] = slice(rows.start - block[axis].start, rows.stop - block[axis].start)
      return values[tuple(at)]
  at = [slice(None)] * x.ndim
  at[axis] = rows
  return np.asarray(hosts.fetch(x))[tuple(at)]
