"""Batched, jitted autoregressive decoding with a KV cache; all K cluster models in one vmapped call.

Prompts are left-padded to a common length T so every row writes the cache at the same index;
positions count from each row's first real token, and padded keys are masked out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hetlm_jax import hosts
from hetlm_jax.config import ModelConfig
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.data.tokenizer import BOS, EOS, PAD
from hetlm_jax.errors import HetlmError
from hetlm_jax.model import PageLM
from hetlm_jax.train.batches import prompts
from hetlm_jax.train.split import merge, num_models
from hetlm_jax.train.step import mix_logprobs


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Decoding: at most `max_new` tokens, greedy (temperature 0) or sampled within top_k and top_p."""

  max_new: int = 20
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: no cut
  top_p: float = 1.0

  def __post_init__(self):
    whole = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    number = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    if not whole(self.max_new) or self.max_new < 1:
      raise HetlmError(f"Sampling: max_new={self.max_new!r} must be a whole number of at least 1")
    if not number(self.temperature) or not self.temperature >= 0:
      raise HetlmError(f"Sampling: temperature={self.temperature!r} must be 0 (greedy) or more")
    if not whole(self.top_k) or self.top_k < 0:
      raise HetlmError(f"Sampling: top_k={self.top_k!r} must be a whole number, 0 (no cut) or more")
    if not number(self.top_p) or not 0 < self.top_p <= 1:
      raise HetlmError(f"Sampling: top_p={self.top_p!r} must be in (0, 1]")


def _pick(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  logits_BxV = logits_BxV.at[:, PAD].set(-jnp.inf).at[:, BOS].set(-jnp.inf)
  if s.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV / s.temperature
  if s.top_k > 0:
    kth_B = jax.lax.top_k(logits_BxV, s.top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B, -jnp.inf, logits_BxV)
  if s.top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
    keep_BxV = (cum_BxV - jax.nn.softmax(sorted_BxV, axis=-1)) < s.top_p
    cutoff_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1)


def decode_one(cfg: ModelConfig, s: Sampling, params, prompt_BxT, pad_B, key, anchor=None, lam=None):
  """Continues each left-padded prompt by up to s.max_new tokens; after EOS a row emits PAD. With `anchor`
  (--mix_init) each token is drawn from lam p + (1 - lam) p_anchor, the anchor decoding beside with its own
  cache."""
  model = PageLM(cfg)
  b, p = prompt_BxT.shape
  size = p + s.max_new
  slots_S = jnp.arange(size)
  key_valid_BxS = slots_S[None, :] >= pad_B[:, None]
  shape = (cfg.n_layers, b, size, cfg.n_heads, cfg.head_dim)
  empty = {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}
  kv = (empty, empty if anchor is not None else None)

  def run(tokens_BxT, index, kv):
    query_T = index + jnp.arange(tokens_BxT.shape[1])
    mask_Bx1xTxS = (slots_S[None, None, None, :] <= query_T[None, None, :, None]) & key_valid_BxS[:, None, None, :]
    positions_BxT = jnp.maximum(query_T[None, :] - pad_B[:, None], 0)
    at = {"index": index, "positions": positions_BxT, "mask": mask_Bx1xTxS}
    logits_BxTxV, own = model.apply({"params": params}, tokens_BxT, cache={**kv[0], **at})
    if anchor is None:
      return logits_BxTxV, (own, None)
    anchor_BxTxV, theirs = model.apply({"params": anchor}, tokens_BxT, cache={**kv[1], **at})
    # log-probabilities of the mixture, which _pick samples from as it would from logits
    return mix_logprobs(jax.nn.log_softmax(logits_BxTxV), jax.nn.log_softmax(anchor_BxTxV), lam), (own, theirs)

  logits_BxTxV, kv = run(prompt_BxT, 0, kv)

  def step(carry, i):
    logits_BxV, kv, done_B = carry
    token_B = _pick(logits_BxV, jax.random.fold_in(key, i), s)
    out_B = jnp.where(done_B, PAD, token_B)
    done_B = done_B | (token_B == EOS)
    logits_Bx1xV, kv = run(out_B[:, None], p + i, kv)
    return (logits_Bx1xV[:, 0], kv, done_B), out_B

  carry = (logits_BxTxV[:, -1], kv, jnp.zeros(b, bool))
  _, out_OxB = jax.lax.scan(step, carry, jnp.arange(s.max_new))
  return out_OxB.T


@functools.lru_cache(maxsize=8)
def make_decoder(cfg: ModelConfig, s: Sampling, mixed: bool = False):
  """jit(vmap(decode_one)) over K split, stacked models: prompts [K, B, T], pads [K, B], keys [K] → [K, B, O].
  `mixed` (--mix_init): it also takes the anchor (one model) and lam [K]."""
  if not mixed:
    one = lambda shared, cluster, *args: decode_one(cfg, s, merge(shared, cluster), *args)
    return jax.jit(
      lambda params, *args: jax.vmap(one, in_axes=(None, 0, 0, 0, 0))(params["shared"], params["cluster"], *args)
    )
  one = lambda shared, cluster, anchor, lam, *args: decode_one(cfg, s, merge(shared, cluster), *args, anchor, lam)
  return jax.jit(
    lambda params, anchor, lam_K, *args: jax.vmap(one, in_axes=(None, 0, None, 0, 0, 0, 0))(
      params["shared"], params["cluster"], anchor, lam_K, *args
    )
  )


def generate(
  cfg: ModelConfig,
  params,
  seqs: UserSequences,
  assignment_U: np.ndarray,
  users: np.ndarray,
  s: Sampling,
  seed: int = 0,
  batch: int = 256,
  mix=None,
) -> list[np.ndarray]:
  """Next session of each listed user from their own cluster's model; the tokens before EOS/PAD. `mix`: a
  Trainer's (anchor, lam_K) under --mix_init, whose mixtures then generate."""
  k = num_models(params)
  length = max(cfg.context - s.max_new, 2)
  decoder = functools.partial(make_decoder(cfg, s, mix is not None), params, *(mix or ()))
  users = np.asarray(users)
  clusters = assignment_U[users]
  out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(users)
  # Each cluster's users in columns of a [K, batch] table: one vmapped call serves every cluster.
  order = np.argsort(clusters, kind="stable")
  rank = np.arange(len(users)) - np.searchsorted(clusters[order], clusters[order])
  n_cols = int(np.bincount(clusters, minlength=k).max()) if len(users) else 0
  table = np.full((k, max(n_cols, 1)), -1, np.int64)
  table[clusters[order], rank] = order
  for lo in range(0, n_cols, batch):
    cols = table[:, lo : lo + batch]
    cols = np.pad(cols, ((0, 0), (0, batch - cols.shape[1])), constant_values=-1)
    user_KxB = np.where(cols >= 0, users[np.maximum(cols, 0)], -1)
    p, pad = prompts(seqs, user_KxB.reshape(-1), length)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), lo), k)
    tokens_KxBxO = np.asarray(hosts.fetch(decoder(p.reshape(k, batch, -1), pad.reshape(k, batch), keys)))
    for c, b in zip(*np.nonzero(cols >= 0)):  # collect per user: a loop over output rows, not over models
      row = tokens_KxBxO[c, b]
      stop = np.flatnonzero((row == EOS) | (row == PAD))
      out[cols[c, b]] = row[: stop[0] if len(stop) else len(row)]
  return out
