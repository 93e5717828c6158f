"""The fast path computes what the plain one did: FLOP count, chunked loss, output layer, prefetched batches."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_batches import _seqs

from hetlm_jax.bench.flops import model_flops_per_token
from hetlm_jax.config import ModelConfig
from hetlm_jax.model import PageLM, init_params, project
from hetlm_jax.train.batches import ClusterBatches
from hetlm_jax.train.prefetch import Prefetcher
from hetlm_jax.train.step import output_nll, token_nll

CFG = ModelConfig(vocab_size=23, context=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0)


def test_flops_per_token_match_a_hand_count():
  # Per layer: q, k, v, o 4 x 16 x 16 = 1024, up and down 2 x 16 x 32 = 1024; output layer 16 x 23 = 368.
  # Matmul parameters 2 x 2048 + 368 = 4464; attention 2 products x 8 positions x 16 wide per layer.
  assert model_flops_per_token(CFG) == 6 * 4464 + 6 * 2 * (2 * 8 * 16)
  lora = dataclasses.replace(CFG, lora_rank=2)  # A and B on q, k, v, o (16 -> 2 -> 16), up (16 -> 2 -> 32), down
  extra = 4 * (2 * 16 + 2 * 16) + (2 * 16 + 2 * 32) + (2 * 32 + 2 * 16)
  assert model_flops_per_token(lora) == model_flops_per_token(CFG) + 6 * 2 * extra  # in both layers


@pytest.mark.parametrize("tie,bias", [(True, False), (False, False), (True, True)])
def test_output_layer_function_equals_the_modules_logits(tie, bias):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie, output_bias=bias)
  params = init_params(cfg, jax.random.key(0))
  if bias:
    params = {**params, "output_bias": jnp.arange(cfg.vocab_size, dtype=jnp.float32) / 10}
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, cfg.context)).astype(np.int32)
  model = PageLM(cfg)
  logits = model.apply({"params": params}, tokens)
  hidden = model.apply({"params": params}, tokens, hidden_only=True)
  np.testing.assert_allclose(
    project(cfg, params, hidden.reshape(-1, cfg.d_model)), logits.reshape(-1, cfg.vocab_size), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("pages_only", [False, True])
def test_chunked_cross_entropy_equals_the_full_one_and_its_gradient(pages_only):
  params = init_params(CFG, jax.random.key(1))
  rng = np.random.default_rng(1)
  tokens = rng.integers(4, CFG.vocab_size, (5, CFG.context + 1)).astype(np.int32)
  model = PageLM(CFG)

  def loss(p, chunk):
    return token_nll(model, p, tokens, pages_only=pages_only, chunk=chunk).sum()

  full, full_grads = jax.value_and_grad(loss)(params, 10**9)
  chunked, chunked_grads = jax.value_and_grad(loss)(
    params, 3 * CFG.vocab_size
  )  # 3 positions per chunk, 40 = 13 x 3 + 1
  np.testing.assert_allclose(chunked, full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(full_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  h = jnp.ones((2, 3, CFG.d_model))
  assert output_nll(CFG, params, h, jnp.zeros((2, 3), jnp.int32), chunk=1).shape == (2, 3)


def test_prefetched_batches_are_the_same_in_the_same_order_from_any_step():
  seqs, _ = _seqs(40)
  batches = ClusterBatches(
    seqs, np.arange(seqs.num_users) % 3, k=3, batch_size=4, context=12, epochs=3, seed=0, round_index=0
  )
  fresh = lambda: ClusterBatches(
    seqs, np.arange(seqs.num_users) % 3, k=3, batch_size=4, context=12, epochs=3, seed=0, round_index=0
  )
  for first in (0, 5):  # from the start, and resumed mid-round
    expected = [fresh().batch(s) for s in range(first, batches.steps)]
    got = list(Prefetcher(fresh().batch, lambda b: b, first, batches.steps, depth=2))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
      for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_prefetch_raises_the_threads_error_and_stops_when_left_early():
  def make(s):
    if s == 3:
      raise ValueError("bad batch 3")
    return (s,)

  with pytest.raises(ValueError, match="bad batch 3"):
    list(Prefetcher(make, lambda b: b, 0, 10, depth=2))
  feed = Prefetcher(lambda s: (s,), lambda b: b, 0, 1000, depth=2)
  for (s,) in feed:
    if s == 2:
      break
  feed.close()
  assert not any(t.name == "hetlm-prefetch" for t in threading.enumerate())


def test_cpu_attention_equals_jax_dot_product_attention_within_segments():
  from hetlm_jax.model import causal_attention

  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 4)), jnp.float32) for _ in range(3))
  segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  mask = segments[:, None, :, None] == segments[:, None, None, :]
  for m in (mask, None):
    np.testing.assert_allclose(
      causal_attention(q, k, v, m, fused=False), causal_attention(q, k, v, m, fused=True), rtol=1e-5, atol=1e-6
    )


def test_a_metrics_window_averages_each_clusters_loss_over_the_steps_where_it_had_real_tokens(tmp_path):
  import types

  from hetlm_jax.train.loop import Trainer
  from hetlm_jax.train.metrics import MetricsLog, Progress

  step = lambda tokens, nll, grad: {
    "tokens": np.array(tokens, np.float32),
    "nll_sum": np.array(nll, np.float32),
    "real_tokens": np.array(tokens, np.int32),
    "grad_norm": np.array(grad, np.float32),
    "learning_rate": np.array([1e-3] * 3),
    "step": np.array([7] * 3),
  }
  # Cluster 1 has real tokens in the first step only; cluster 2 in none.
  window = [step([10, 4, 0], [20, 8, 0], [1.0, 3.0, 0.0]), step([10, 0, 0], [10, 0, 0], [2.0, 0.0, 0.0])]
  log = MetricsLog(tmp_path / "m.jsonl")
  trainer = types.SimpleNamespace(_stepped=True, _check_finite=Trainer._check_finite)
  Trainer._report(trainer, window, log, Progress(10, "t"), 0.0, 2, {"model": "x"})
  [record] = log.records("train")
  assert record["loss_per_model"] == [1.5, 2.0, None] and record["grad_norm"] == [1.5, 3.0, None]
  assert record["model"] == "x" and record["step"] == 7 and record["steps"] == 2
  assert record["loss"] == pytest.approx((20 + 8 + 10) / 24)
