"""The single-model step, vmapped over K stacked models inside one jit, and the vmapped scoring pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hetlm_jax.config import Config, ModelConfig
from hetlm_jax.data.tokenizer import BOS, EOS, PAD
from hetlm_jax.model import PageLM, project
from hetlm_jax.train.split import map_models, merge, model_params, num_models, partition, per_model
from hetlm_jax.train.state import TrainState, cluster_spec, learning_rate, state_shardings

# Logits of at most this many elements per model exist at once in the loss: [K, B, T, V] would not fit
# with a large page vocabulary (Amazon: 23,715 items).
LOGITS_CHUNK = 1 << 22


def output_nll(cfg: ModelConfig, params, h_BxTxD, targets_BxT, pages_only=False, chunk=LOGITS_CHUNK):
  """NLL (nats) of each target under the output layer applied to the final hidden states, over chunks of
  positions so at most ~`chunk` logits exist at once (each chunk's logits are recomputed in the backward
  pass). `pages_only`: the distribution is renormalised over everything but PAD, BOS and EOS."""
  b, t, d = h_BxTxD.shape
  n, v = b * t, cfg.vocab_size

  def nll_of(h_NxD, y_N):
    logits_NxV = project(cfg, params, h_NxD)
    if pages_only:
      ends_V = jnp.zeros(v, bool).at[jnp.array([PAD, BOS, EOS])].set(True)
      logits_NxV = jnp.where(ends_V, -jnp.inf, logits_NxV)
    return optax.softmax_cross_entropy_with_integer_labels(logits_NxV, y_N)

  h_BTxD, y_BT = h_BxTxD.reshape(n, d), targets_BxT.reshape(n)
  c = max(1, min(n, chunk // max(v, 1)))
  if c == n:
    return nll_of(h_BTxD, y_BT).reshape(b, t)
  pad = -n % c
  h_MxNxD = jnp.pad(h_BTxD, ((0, pad), (0, 0))).reshape(-1, c, d)
  y_MxN = jnp.pad(y_BT, (0, pad)).reshape(-1, c)
  nll_MxN = jax.lax.map(jax.checkpoint(lambda hy: nll_of(*hy)), (h_MxNxD, y_MxN))
  return nll_MxN.reshape(-1)[:n].reshape(b, t)


def token_nll(
  model: PageLM,
  params,
  inputs_BxT1,
  segments_BxT1=None,
  deterministic=True,
  rngs=None,
  pages_only=False,
  chunk=LOGITS_CHUNK,
):
  """Per-position NLL (nats) of inputs[:, 1:] given inputs[:, :-1]; `pages_only`: see output_nll."""
  segments_BxT = None if segments_BxT1 is None else segments_BxT1[:, :-1]
  h_BxTxD = model.apply(
    {"params": params}, inputs_BxT1[:, :-1], segments_BxT, deterministic=deterministic, rngs=rngs, hidden_only=True
  )
  return output_nll(model.cfg, params, h_BxTxD, inputs_BxT1[:, 1:], pages_only, chunk)


def packed_loss_mask(segments_BxT1: jax.Array) -> jax.Array:
  """Token t+1 is a training target iff it is real and in the same segment as token t."""
  return (segments_BxT1[:, 1:] == segments_BxT1[:, :-1]) & (segments_BxT1[:, 1:] != 0)


def single_model_grads(model, params, inputs_BxT1, segments_BxT1, weights_BxT1, key):
  """Gradient of one model's loss on its packed batch: the weighted mean NLL of its predicted tokens
  (1 under hard assignment, responsibilities under soft, divided by a token's appearances in the epoch when
  clusters are balanced); padding (segment 0) is out of the loss."""
  weight_BxT = jnp.where(packed_loss_mask(segments_BxT1), weights_BxT1[:, 1:], 0.0)

  def loss_fn(params):
    nll_BxT = token_nll(model, params, inputs_BxT1, segments_BxT1, deterministic=False, rngs={"dropout": key})
    tokens = weight_BxT.sum()
    nll_sum = (weight_BxT * nll_BxT).sum()
    return nll_sum / jnp.maximum(tokens, 1e-6), (nll_sum, tokens)

  (loss, (nll_sum, tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  real = (weight_BxT > 0).sum()
  return grads, {
    "loss": loss,
    "nll_sum": nll_sum,
    "tokens": tokens,
    "real_tokens": real,
    "grad_norm": optax.tree.norm(grads),
  }


def apply_update(tx, lr, grads, opt_state, params, active):
  """One AdamW update; where `active` is false (no real token in the batch) params and moments stay as they are."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
  keep = lambda new, old: jnp.where(active, new, old)
  return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)


# --stack=auto unrolls at most this many models (on a CPU). Unrolled, K >= 2 models step 3-13% faster there, but
# their program compiles 2.6 s (K=2) to 20 s (K=8) longer than the vmapped one, which takes 100-220 steps to win
# back; the main job's HeTLM trains 14 (docs/BENCHMARKS.md, "Compile time").
UNROLL_MAX_K = 1


def unrolled(cfg: Config, mesh: Mesh, k: int) -> bool:
  """--stack resolved for K models: auto unrolls them on a CPU, unless K is sharded over devices or K is above
  UNROLL_MAX_K; it maps over them (vmap) elsewhere."""
  if cfg.train.stack != "auto":
    return cfg.train.stack == "unroll"
  return jax.default_backend() == "cpu" and mesh.shape["cluster"] == 1 and k <= UNROLL_MAX_K


def stacked_step(
  model,
  tx,
  spec: str,
  n_layers: int,
  unroll: bool,
  lr,
  params,
  opt_state,
  inputs_KxBxT1,
  segments_KxBxT1,
  weights_KxBxT1,
  keys_K,
  prox: float = 0.0,
  anchor=None,
):
  """The K models' step: each model's gradient by `single_model_grads` (mapped over K, see map_models);
  each cluster's own part updates from its own gradient, the shared part from the token-weighted mean of
  the K gradients, i.e. the gradient of the mean loss over every real token of the step.

  `prox` > 0 adds the gradient of prox/2 ||theta - anchor||^2 (`anchor`: one model's parameters, split as
  `params` are, e.g. the LM the K models were warm-started from): a pull of every model toward it."""

  def grads_of_one(cluster, *batch):
    grads, metrics = single_model_grads(model, merge(params["shared"], cluster), *batch)
    return partition(spec, n_layers, grads), metrics

  grads, metrics = map_models(grads_of_one, unroll)(
    params["cluster"], inputs_KxBxT1, segments_KxBxT1, weights_KxBxT1, keys_K
  )
  tokens_K = metrics["tokens"]
  share_K = tokens_K / jnp.maximum(tokens_K.sum(), 1e-6)
  shared_grads = jax.tree.map(lambda g_K: jnp.tensordot(share_K, g_K, axes=1), grads["shared"])
  if prox:
    pull = lambda g, p, a: g + prox * (p - a)  # the anchor broadcasts over the cluster part's K axis
    shared_grads = jax.tree.map(pull, shared_grads, params["shared"], anchor["shared"])
    grads = {**grads, "cluster": jax.tree.map(pull, grads["cluster"], params["cluster"], anchor["cluster"])}
  update = functools.partial(apply_update, tx, lr)
  cluster, cluster_opt = map_models(update, unroll)(
    grads["cluster"], opt_state["cluster"], params["cluster"], tokens_K > 0
  )
  shared, shared_opt = update(shared_grads, opt_state["shared"], params["shared"], tokens_K.sum() > 0)
  return {"shared": shared, "cluster": cluster}, {"shared": shared_opt, "cluster": cluster_opt}, metrics


def make_train_step(cfg: Config, tx, mesh: Mesh, abstract: TrainState, prox: float = 0.0):
  """jit(stacked_step) with the state donated, B sharded over 'data', K over 'cluster'.

  Batch: inputs and segment ids [K, B, T+1] int32 (0: padding), and optionally token weights [K, B, T+1]
  float32 (default: 1 on every real token). With `prox` > 0 the step also takes `anchor`, one model's
  parameters (see stacked_step). Returns (state, metrics), metrics per model [K].
  """
  model = PageLM(cfg.model)
  seed = cfg.train.seed
  k = num_models(abstract.params)
  spec = cluster_spec(cfg, k)
  step_fn = functools.partial(stacked_step, model, tx, spec, cfg.model.n_layers, unrolled(cfg, mesh, k), prox=prox)

  def train_step(state: TrainState, inputs_KxBxT1, segments_KxBxT1, weights_KxBxT1, anchor=None):
    # Dropout keys depend only on (seed, step): a resumed run draws the same ones.
    keys_K = jax.random.split(jax.random.fold_in(jax.random.key(seed), state.step), inputs_KxBxT1.shape[0])
    lr = learning_rate(cfg, state)
    split_anchor = None if anchor is None else partition(spec, cfg.model.n_layers, anchor)
    params, opt_state, metrics = step_fn(
      lr, state.params, state.opt_state, inputs_KxBxT1, segments_KxBxT1, weights_KxBxT1, keys_K, anchor=split_anchor
    )
    metrics["learning_rate"] = jnp.broadcast_to(lr, keys_K.shape)
    metrics["step"] = jnp.broadcast_to(state.step + 1, keys_K.shape)  # the global step this one ends at
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  shardings = state_shardings(mesh, abstract)
  batch = NamedSharding(mesh, P("cluster", "data"))
  # Metrics [K] on every device: any process reads them whenever it likes (the progress line is timed), with
  # no collective that the other processes would have to join.
  per_model_sharding = NamedSharding(mesh, P())
  in_shardings = (shardings, batch, batch, batch) + ((NamedSharding(mesh, P()),) if prox else ())
  jitted = jax.jit(
    train_step, in_shardings=in_shardings, out_shardings=(shardings, per_model_sharding), donate_argnums=0
  )

  def step(state: TrainState, inputs_KxBxT1, segments_KxBxT1, weights_KxBxT1=None, anchor=None):
    if weights_KxBxT1 is None:
      weights_KxBxT1 = (np.asarray(segments_KxBxT1) > 0).astype(np.float32)
    if prox:
      if anchor is None:
        raise ValueError("a step with prox > 0 needs the anchor parameters")
      return jitted(state, inputs_KxBxT1, segments_KxBxT1, weights_KxBxT1, anchor)
    return jitted(state, inputs_KxBxT1, segments_KxBxT1, weights_KxBxT1)

  step.jitted = jitted  # the compiled function, e.g. to check that it compiles once
  step.batch_sharding = batch
  return step


def mix_nll(nll: jax.Array, anchor_nll: jax.Array, lam) -> jax.Array:
  """NLL of each token under lam p + (1 - lam) p_anchor, from the NLL under each (--mix_init): lam 1 gives
  `nll` exactly and lam 0 `anchor_nll` (log 0 = -inf drops a term)."""
  return -jnp.logaddexp(jnp.log(lam) - nll, jnp.log1p(-lam) - anchor_nll)


def mix_logprobs(logp: jax.Array, anchor_logp: jax.Array, lam) -> jax.Array:
  """log(lam p + (1 - lam) p_anchor) of log-distributions (--mix_init)."""
  return jnp.logaddexp(jnp.log(lam) + logp, jnp.log1p(-lam) + anchor_logp)


def make_score_fn(
  cfg: Config, mesh: Mesh, abstract: TrainState, slots: int, pages_only: bool = False, mixed: bool = False
):
  """Every one of the K models scores the same packed rows: tokens and segments [B, T+1], mask [B, T] and the
  batch-local user of each predicted token [B, T] (0 <= user < `slots`) → the masked NLL summed per local
  user on the device, [K, slots]; only that comes back to the host. `pages_only`: see token_nll.

  `mixed` (--mix_init): the function takes two more arguments after the params, `anchor` (one model's
  parameters) and `lam_K`, and model k's token probabilities are lam_k p_k + (1 - lam_k) p_anchor (with
  `pages_only`, of the two models' page distributions)."""
  model = PageLM(cfg.model)
  unroll = unrolled(cfg, mesh, num_models(abstract.params))

  def sums(nll_BxT, mask_BxT, user_BxT):
    return jax.ops.segment_sum(jnp.where(mask_BxT, nll_BxT, 0.0).ravel(), user_BxT.ravel(), num_segments=slots)

  def score(params, inputs_BxT1, segments_BxT1, mask_BxT, user_BxT):
    def one_model(p):
      return sums(token_nll(model, p, inputs_BxT1, segments_BxT1, pages_only=pages_only), mask_BxT, user_BxT)

    return per_model(one_model, unroll)(params)

  def score_mixed(params, anchor, lam_K, inputs_BxT1, segments_BxT1, mask_BxT, user_BxT):
    nll_of = lambda p: token_nll(model, p, inputs_BxT1, segments_BxT1, pages_only=pages_only)
    anchor_nll_BxT = nll_of(anchor)
    nll_KxBxT = per_model(nll_of, unroll)(params)
    mixed_KxBxT = mix_nll(nll_KxBxT, anchor_nll_BxT[None], lam_K[:, None, None])
    return jax.vmap(sums, in_axes=(0, None, None))(mixed_KxBxT, mask_BxT, user_BxT)

  params_sharding = state_shardings(mesh, abstract).params
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  out = NamedSharding(mesh, P("cluster"))
  if mixed:
    return jax.jit(
      score_mixed, in_shardings=(params_sharding, replicated, replicated, rows, rows, rows, rows), out_shardings=out
    )
  return jax.jit(score, in_shardings=(params_sharding, rows, rows, rows, rows), out_shardings=out)


def make_hidden_fn(cfg: Config, mesh: Mesh, abstract: TrainState):
  """Final hidden states [K, B, T+1, D] of packed rows under every model (for user embeddings)."""
  model = PageLM(cfg.model)

  def hidden(params, inputs_BxT1, segments_BxT1):
    one = lambda p: model.apply({"params": p}, inputs_BxT1, segments_BxT1, hidden_only=True)
    return per_model(one)(params).astype(jnp.float32)

  rows = NamedSharding(mesh, P("data"))
  return jax.jit(
    hidden,
    in_shardings=(state_shardings(mesh, abstract).params, rows, rows),
    out_shardings=NamedSharding(mesh, P("cluster", "data")),
  )


def make_next_logprobs_fn(cfg: Config, mesh: Mesh, abstract: TrainState, mixed: bool = False):
  """log p(next token) after each right-padded row's last real token: under every model [K, B, V], and
  under one model k, for a batch of one cluster's users [B, V] (K times cheaper). `mixed` (--mix_init): both
  take `anchor` and `lam_K` after the params, and model k's distribution is lam_k p_k + (1 - lam_k) p_anchor."""
  model = PageLM(cfg.model)

  def one_model(p, inputs_BxT, last_B):
    logits_Bx1xV = model.apply({"params": p}, inputs_BxT, only_at_B=last_B)
    return jax.nn.log_softmax(logits_Bx1xV[:, 0], axis=-1)

  def every_model(params, inputs_BxT, last_B):
    return per_model(one_model)(params, inputs_BxT, last_B)

  def model_k(params, k, inputs_BxT, last_B):
    return one_model(model_params(params, k), inputs_BxT, last_B)

  def every_mixed(params, anchor, lam_K, inputs_BxT, last_B):
    return mix_logprobs(
      every_model(params, inputs_BxT, last_B), one_model(anchor, inputs_BxT, last_B)[None], lam_K[:, None, None]
    )

  def mixed_k(params, anchor, lam_K, k, inputs_BxT, last_B):
    return mix_logprobs(model_k(params, k, inputs_BxT, last_B), one_model(anchor, inputs_BxT, last_B), lam_K[k])

  params, rows = state_shardings(mesh, abstract).params, NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  every_out = NamedSharding(mesh, P("cluster", "data"))
  if mixed:
    return (
      jax.jit(every_mixed, in_shardings=(params, replicated, replicated, rows, rows), out_shardings=every_out),
      jax.jit(mixed_k, in_shardings=(params, replicated, replicated, replicated, rows, rows), out_shardings=rows),
    )
  return (
    jax.jit(every_model, in_shardings=(params, rows, rows), out_shardings=every_out),
    jax.jit(model_k, in_shardings=(params, replicated, rows, rows), out_shardings=rows),
  )
