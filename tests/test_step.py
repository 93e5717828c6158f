"""The stacked step: K vmapped models train exactly like K separate ones, on 1 device or 4."""

import dataclasses

import jax
import numpy as np
import pytest

from hetlm_jax.config import ClusterConfig, Config, ModelConfig, TrainConfig
from hetlm_jax.train.state import create_state, make_mesh, make_optimizer, abstract_state
from hetlm_jax.train.step import make_train_step

CFG = Config(model=ModelConfig(vocab_size=19, context=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
             train=TrainConfig(batch_size=8, learning_rate=1e-2, warmup_frac=0.0))


def _batch(k, cfg=CFG, seed=0):
  """Random tokens; every row holds two packed segments and then padding."""
  rng = np.random.default_rng(seed)
  shape = (k, cfg.train.batch_size, cfg.model.context + 1)
  inputs = rng.integers(4, cfg.model.vocab_size, shape).astype(np.int32)
  t = np.arange(shape[-1])
  cut, end = rng.integers(2, 5, shape[:2] + (1,)), rng.integers(6, shape[-1] + 1, shape[:2] + (1,))
  segments = np.where(t < cut, 1, np.where(t < end, 2, 0)).astype(np.int32)
  return inputs, segments


def _run(cfg, k, devices, steps=2, batch_seed=0):
  mesh = make_mesh(cfg, k, devices)
  tx = make_optimizer(cfg)
  abstract = abstract_state(cfg, tx, mesh, k)
  state = create_state(cfg, tx, mesh, k).replace(round_steps=np.int32(10))
  step = make_train_step(cfg, tx, mesh, abstract)
  history = []
  for s in range(steps):
    state, metrics = step(state, *_batch(k, cfg, batch_seed + s))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_vmapped_step_equals_k_separate_single_model_steps():
  k = 3
  stacked, stacked_metrics = _run(CFG, k, jax.devices()[:1])
  mesh = make_mesh(CFG, 1, jax.devices()[:1])
  tx = make_optimizer(CFG)
  step = make_train_step(CFG, tx, mesh, abstract_state(CFG, tx, mesh, 1))
  full = create_state(CFG, tx, mesh, k)
  for c in range(k):
    # Model c alone, started from the same initial parameters, fed only its own slice of each batch.
    state = jax.tree.map(lambda x: x[c:c + 1] if getattr(x, "ndim", 0) else x, jax.device_get(full))
    state = state.replace(round_steps=np.int32(10))
    for s in range(2):
      inputs, mask = _batch(k, CFG, s)
      state, metrics = step(state, inputs[c:c + 1], mask[c:c + 1])
      np.testing.assert_allclose(metrics["loss"][0], stacked_metrics[s]["loss"][c], rtol=1e-5)
      np.testing.assert_allclose(metrics["grad_norm"][0], stacked_metrics[s]["grad_norm"][c], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b[c], rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), stacked.params)


@pytest.mark.parametrize("cluster_axis", [1, 2])
def test_step_sharded_over_four_devices_equals_the_one_device_step(cluster_axis):
  assert jax.device_count() == 4, "conftest forces 4 CPU devices"
  cfg = dataclasses.replace(CFG, cluster=ClusterConfig(k=2, cluster_axis=cluster_axis))
  one, one_metrics = _run(dataclasses.replace(cfg, cluster=ClusterConfig(k=2)), 2, jax.devices()[:1])
  four, four_metrics = _run(cfg, 2, jax.devices())
  for a, b in zip(one_metrics, four_metrics):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one.params, four.params)


def test_a_cluster_with_only_padding_rows_gets_zero_loss_and_zero_gradient():
  mesh = make_mesh(CFG, 2, jax.devices()[:1])
  tx = make_optimizer(CFG)
  step = make_train_step(CFG, tx, mesh, abstract_state(CFG, tx, mesh, 2))
  inputs, segments = _batch(2)
  segments[1] = 0
  _, metrics = step(create_state(CFG, tx, mesh, 2), inputs, segments)
  assert metrics["tokens"][1] == 0 and metrics["loss"][1] == 0 and metrics["grad_norm"][1] == 0
  assert metrics["loss"][0] > 0


def test_token_weights_give_a_weighted_mean_loss():
  mesh = make_mesh(CFG, 2, jax.devices()[:1])
  tx = make_optimizer(CFG)
  step = make_train_step(CFG, tx, mesh, abstract_state(CFG, tx, mesh, 2))
  inputs, segments = _batch(2)
  ones = (segments > 0).astype(np.float32)
  _, plain = step(create_state(CFG, tx, mesh, 2), inputs, segments)
  # The loss is a weighted mean: a constant factor per model changes nothing.
  _, scaled = step(create_state(CFG, tx, mesh, 2), inputs, segments, ones * np.array([0.3, 2.0])[:, None, None])
  np.testing.assert_allclose(scaled["loss"], plain["loss"], rtol=1e-5)
  np.testing.assert_allclose(scaled["grad_norm"], plain["grad_norm"], rtol=1e-4)
  # Weight 0 on a row is the same as that row being padding.
  zero_row = ones.copy()
  zero_row[:, 0] = 0
  padded = segments.copy()
  padded[:, 0] = 0
  _, weighted = step(create_state(CFG, tx, mesh, 2), inputs, segments, zero_row)
  _, dropped = step(create_state(CFG, tx, mesh, 2), inputs, padded)
  np.testing.assert_allclose(weighted["loss"], dropped["loss"], rtol=1e-5)
  np.testing.assert_allclose(weighted["grad_norm"], dropped["grad_norm"], rtol=1e-4)
