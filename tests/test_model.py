import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetlm_jax.config import ModelConfig
from hetlm_jax.model import PageLM, init_params, matched_config, param_count

TINY = ModelConfig(vocab_size=23, context=12, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_changing_a_later_token_never_changes_earlier_logits(positions):
  cfg = dataclasses.replace(TINY, positions=positions)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, cfg.context), 4, cfg.vocab_size)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1 - 4) % (cfg.vocab_size - 4) + 4)
  a = PageLM(cfg).apply({"params": params}, tokens)
  b = PageLM(cfg).apply({"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


@pytest.mark.parametrize(
  "change",
  [
    {},
    {"positions": "learned"},
    {"tie_embeddings": False},
    {"n_layers": 3, "d_ff": 40},
    {"lora_rank": 3},
    {"output_bias": True, "tie_embeddings": False},
  ],
)
def test_param_count_matches_initialised_params(change):
  cfg = dataclasses.replace(TINY, **change)
  shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
  assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(shapes))


def test_matched_config_is_within_ten_percent_of_k_times_the_cluster_model():
  for k in (2, 4, 8):
    matched = matched_config(TINY, k * param_count(TINY))
    assert abs(param_count(matched) - k * param_count(TINY)) <= 0.1 * k * param_count(TINY)
    assert matched.n_heads == TINY.n_heads and matched.head_dim % 2 == 0


def test_tying_saves_the_head():
  untied = dataclasses.replace(TINY, tie_embeddings=False)
  assert param_count(untied) == param_count(TINY) + TINY.d_model * TINY.vocab_size + TINY.vocab_size


def test_bfloat16_compute_keeps_float32_params_and_float32_logits():
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  params = init_params(cfg, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = PageLM(cfg).apply({"params": params}, jnp.zeros((1, 5), jnp.int32))
  assert logits.dtype == jnp.float32 and logits.shape == (1, 5, cfg.vocab_size)


def test_dropout_is_active_only_in_training():
  cfg = dataclasses.replace(TINY, dropout=0.5)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.arange(4, 12)[None]
  model = PageLM(cfg)
  eval_a, eval_b = model.apply({"params": params}, tokens), model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  train = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(np.asarray(train), np.asarray(eval_a))
