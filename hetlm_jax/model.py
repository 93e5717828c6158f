"""A small pre-norm decoder-only transformer over page tokens (Flax linen).

Shape suffixes as in the package's legend (hetlm_jax/__init__.py): B batch rows, T positions, S key positions,
D model width, A heads, H head width, F feed-forward width, V vocabulary, N flattened rows.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetlm_jax.config import ModelConfig


def _rope(x_BxTxAxH: jax.Array, positions_BxT: jax.Array) -> jax.Array:
  half = x_BxTxAxH.shape[-1] // 2
  freq_H2 = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * freq_H2
  sin, cos = jnp.sin(angle_BxTxH2)[:, :, None, :], jnp.cos(angle_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxAxH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxAxH.dtype)


def causal_attention(
  q_BxTxAxH: jax.Array,
  k_BxTxAxH: jax.Array,
  v_BxTxAxH: jax.Array,
  mask_Bx1xTxT: jax.Array | None,
  fused: bool | None = None,
) -> jax.Array:
  """Causal self-attention, within segments where `mask` is given. `fused` (default: off a CPU) calls
  jax.nn.dot_product_attention, which takes cuDNN's fused kernel on a GPU where it applies; otherwise two
  einsums in the [B, T, A, H] layout, which on a CPU skip its transposes (10% of a training step, measured
  in docs/BENCHMARKS.md). Scores and softmax in float32."""
  if fused is None:
    fused = jax.default_backend() != "cpu"
  if fused:
    return jax.nn.dot_product_attention(q_BxTxAxH, k_BxTxAxH, v_BxTxAxH, mask=mask_Bx1xTxT, is_causal=True)
  t, h = q_BxTxAxH.shape[1], q_BxTxAxH.shape[-1]
  scores_BxAxTxT = jnp.einsum("btah,bsah->bats", q_BxTxAxH, k_BxTxAxH).astype(jnp.float32) / jnp.sqrt(h)
  allowed = jnp.tril(jnp.ones((t, t), bool))
  if mask_Bx1xTxT is not None:
    allowed = allowed & mask_Bx1xTxT
  scores_BxAxTxT = jnp.where(allowed, scores_BxAxTxT, jnp.finfo(jnp.float32).min)
  probs_BxAxTxT = jax.nn.softmax(scores_BxAxTxT, axis=-1).astype(v_BxTxAxH.dtype)
  return jnp.einsum("bats,bsah->btah", probs_BxAxTxT, v_BxTxAxH)


class Block(nn.Module):
  """One pre-norm transformer block: causal self-attention, then a GELU feed-forward layer."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array | None, deterministic: bool, kv=None
  ):
    """With `kv = (k_BxSxAxH, v_BxSxAxH, index)` (decoding), this step's keys and values are written into
    the cache at `index` and attention runs over the cache under `mask_Bx1xTxS`; returns (x, (k, v))."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    general = lambda features, axis=-1, name=None, **kw: nn.DenseGeneral(
      features, axis=axis, dtype=dtype, param_dtype=jnp.float32, name=name, **kw
    )

    def dense(features, axis=-1, name=None):
      """A projection, plus a low-rank update W + A·B when --cluster_params=adapters:R (B starts at zero)."""
      full = general(features, axis=axis, name=name)
      if not cfg.lora_rank:
        return full
      down = general(cfg.lora_rank, axis=axis, name=f"{name}_lora_a", use_bias=False)
      up = general(features, name=f"{name}_lora_b", use_bias=False, kernel_init=nn.initializers.zeros)
      return lambda x: full(x) + up(down(x))

    h_BxTxD = nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name="ln_attn")(x_BxTxD)
    q_BxTxAxH = dense((cfg.n_heads, cfg.head_dim), name="q")(h_BxTxD)
    k_BxTxAxH = dense((cfg.n_heads, cfg.head_dim), name="k")(h_BxTxD)
    v_BxTxAxH = dense((cfg.n_heads, cfg.head_dim), name="v")(h_BxTxD)
    if cfg.positions == "rope":
      q_BxTxAxH, k_BxTxAxH = _rope(q_BxTxAxH, positions_BxT), _rope(k_BxTxAxH, positions_BxT)
    if kv is None:
      a_BxTxAxH = causal_attention(q_BxTxAxH, k_BxTxAxH, v_BxTxAxH, mask_Bx1xTxS)
    else:
      k_cache, v_cache, index = kv
      k_BxSxAxH = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxTxAxH.astype(k_cache.dtype), index, axis=1)
      v_BxSxAxH = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxTxAxH.astype(v_cache.dtype), index, axis=1)
      a_BxTxAxH = jax.nn.dot_product_attention(
        q_BxTxAxH, k_BxSxAxH.astype(dtype), v_BxSxAxH.astype(dtype), mask=mask_Bx1xTxS
      )
    a_BxTxD = dense(cfg.d_model, axis=(-2, -1), name="o")(a_BxTxAxH)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout)(a_BxTxD, deterministic=deterministic)

    h_BxTxD = nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name="ln_mlp")(x_BxTxD)
    h_BxTxF = nn.gelu(dense(cfg.d_ff, name="up")(h_BxTxD))
    h_BxTxD = dense(cfg.d_model, name="down")(h_BxTxF)
    x_BxTxD = x_BxTxD + nn.Dropout(cfg.dropout)(h_BxTxD, deterministic=deterministic)
    return x_BxTxD if kv is None else (x_BxTxD, (k_BxSxAxH, v_BxSxAxH))


def segment_positions(same_BxTxS: jax.Array) -> jax.Array:
  """Position of each token within its segment (packed rows hold several users' windows), from the
  same-segment matrix: a real segment is contiguous, so it starts at the first column of its row there."""
  return jnp.arange(same_BxTxS.shape[1]) - jnp.argmax(same_BxTxS, axis=-1)


class PageLM(nn.Module):
  """Next-page language model; `__call__` returns logits, or the final hidden states with `hidden_only`.

  `segments_BxT` (optional) packs several sequences per row: tokens attend only within their own
  segment, and positions restart at every segment. `cache` (decoding, see eval/generate.py) holds
  per-layer keys/values [n_layers, B, S, A, H], the write `index`, this step's `positions` [B, T] and the
  attention `mask` [B, 1, T, S]; the call then returns (logits, updated keys/values). `only_at_B`
  keeps just one position per row before the output layer (logits [B, 1, V]): with a large page
  vocabulary the full [B, T, V] logits would dominate memory. `hidden_only` returns the final hidden
  states [B, T, D] before the output layer, which `project` applies (the loss does so in chunks).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxT: jax.Array,
    segments_BxT: jax.Array | None = None,
    deterministic: bool = True,
    cache: dict | None = None,
    only_at_B: jax.Array | None = None,
    hidden_only: bool = False,
  ):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32, name="embed")
    if cache is not None:
      positions_BxT, mask_Bx1xTxS = cache["positions"], cache["mask"]
    elif segments_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
      mask_Bx1xTxS = None
    else:
      same_BxTxS = segments_BxT[:, :, None] == segments_BxT[:, None, :]
      positions_BxT, mask_Bx1xTxS = segment_positions(same_BxTxS), same_BxTxS[:, None]
    x_BxTxD = embed(tokens_BxT).astype(dtype)
    if cfg.positions == "learned":
      pos = nn.Embed(cfg.context, cfg.d_model, param_dtype=jnp.float32, name="pos_embed")
      x_BxTxD = x_BxTxD + pos(positions_BxT).astype(dtype)
    x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=deterministic)
    new_k, new_v = [], []
    for i in range(cfg.n_layers):
      block = Block(cfg, name=f"block_{i}")
      if cache is None:
        x_BxTxD = block(x_BxTxD, positions_BxT, mask_Bx1xTxS, deterministic)
      else:
        x_BxTxD, (k, v) = block(
          x_BxTxD, positions_BxT, mask_Bx1xTxS, deterministic, kv=(cache["k"][i], cache["v"][i], cache["index"])
        )
        new_k.append(k)
        new_v.append(v)
    if only_at_B is not None:
      x_BxTxD = x_BxTxD[jnp.arange(x_BxTxD.shape[0]), only_at_B][:, None]
    h_BxTxD = nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name="ln_final")(x_BxTxD)
    if hidden_only:
      return h_BxTxD
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(h_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, dtype=dtype, param_dtype=jnp.float32, name="head")(h_BxTxD)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    if cfg.output_bias:
      logits_BxTxV = logits_BxTxV + self.param("output_bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
    if cache is not None:
      return logits_BxTxV, {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}
    return logits_BxTxV


def project(cfg: ModelConfig, params, h_NxD: jax.Array) -> jax.Array:
  """The output layer of `PageLM` as a function of its parameters: float32 logits [N, V] of final hidden
  states, the matmul in the compute dtype."""
  dtype = jnp.dtype(cfg.compute_dtype)
  if cfg.tie_embeddings:
    w_DxV, b_V = params["embed"]["embedding"].T, None
  else:
    w_DxV, b_V = params["head"]["kernel"], params["head"]["bias"]
  logits_NxV = jnp.dot(h_NxD.astype(dtype), w_DxV.astype(dtype)).astype(jnp.float32)
  if b_V is not None:
    logits_NxV = logits_NxV + b_V.astype(dtype).astype(jnp.float32)
  if cfg.output_bias:
    logits_NxV = logits_NxV + params["output_bias"]
  return logits_NxV


def init_params(cfg: ModelConfig, key: jax.Array):
  """Parameters of one model (no leading K axis)."""
  return PageLM(cfg).init(key, jnp.zeros((1, cfg.context), jnp.int32))["params"]


def param_count(cfg: ModelConfig) -> int:
  """Closed form of the size of `init_params(cfg)` (a test checks the two agree)."""
  d, f, v, r = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.lora_rank
  block = 2 * 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
  lora = r * (4 * 2 * d + 2 * (d + f))  # A [in, r] and B [r, out] on q, k, v, o, up and down
  head = (0 if cfg.tie_embeddings else d * v + v) + (v if cfg.output_bias else 0)
  positions = cfg.context * d if cfg.positions == "learned" else 0
  return v * d + positions + cfg.n_layers * (block + lora) + 2 * d + head


def matched_config(cfg: ModelConfig, target_params: int) -> ModelConfig:
  """The wider (then deeper) variant of `cfg` whose parameter count is closest to `target_params`.

  Width moves in steps that keep the head count and an even head width; d_ff keeps its ratio.
  """
  ratio = cfg.d_ff / cfg.d_model
  step = 2 * cfg.n_heads
  best, best_err = cfg, abs(param_count(cfg) - target_params)
  for n_layers in range(cfg.n_layers, 2 * cfg.n_layers + 1):
    for d_model in range(step, 8 * cfg.d_model + 1, step):
      candidate = dataclasses.replace(cfg, d_model=d_model, n_layers=n_layers, d_ff=max(1, round(ratio * d_model)))
      err = abs(param_count(candidate) - target_params)
      if err < best_err:
        best, best_err = candidate, err
      if param_count(candidate) > target_params:
        break
  return best
