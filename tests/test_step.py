"""The stacked step: K vmapped models train exactly like K separate ones, on 1 device or 4."""

import dataclasses

import jax
import numpy as np
import pytest

from hetlm_jax.config import ClusterConfig, Config, ModelConfig, TrainConfig
from hetlm_jax.train.state import abstract_state, create_state, make_mesh, make_optimizer
from hetlm_jax.train.step import make_train_step

CFG = Config(
  model=ModelConfig(vocab_size=19, context=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
  train=TrainConfig(batch_size=8, learning_rate=1e-2, warmup_frac=0.0),
)


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


@pytest.mark.parametrize("stack", ["vmap", "unroll"])
def test_vmapped_step_equals_k_separate_single_model_steps(stack):
  k = 3
  stacked_cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, stack=stack))
  stacked, stacked_metrics = _run(stacked_cfg, k, jax.devices()[:1])
  mesh = make_mesh(CFG, 1, jax.devices()[:1])
  tx = make_optimizer(CFG)
  step = make_train_step(CFG, tx, mesh, abstract_state(CFG, tx, mesh, 1))
  full = create_state(CFG, tx, mesh, k)
  for c in range(k):
    # Model c alone, started from the same initial parameters, fed only its own slice of each batch.
    full_host = jax.device_get(full)
    own = lambda tree: {"shared": tree["shared"], "cluster": jax.tree.map(lambda x: x[c : c + 1], tree["cluster"])}
    state = full_host.replace(params=own(full_host.params), opt_state=own(full_host.opt_state))
    state = state.replace(round_steps=np.int32(10))
    for s in range(2):
      inputs, mask = _batch(k, CFG, s)
      state, metrics = step(state, inputs[c : c + 1], mask[c : c + 1])
      np.testing.assert_allclose(metrics["loss"][0], stacked_metrics[s]["loss"][c], rtol=1e-5)
      np.testing.assert_allclose(metrics["grad_norm"][0], stacked_metrics[s]["grad_norm"][c], rtol=1e-4)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[0], b[c], rtol=1e-4, atol=1e-6),
      jax.device_get(state.params),
      stacked.params,
    )


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


TOP1 = dataclasses.replace(
  CFG, model=dataclasses.replace(CFG.model, n_layers=2, output_bias=True), cluster=ClusterConfig(cluster_params="top:1")
)


@pytest.mark.parametrize("spec,unroll", [("head", False), ("top:1", True), ("adapters:2", False), ("adapters:2", True)])
def test_split_step_gives_the_shared_part_the_mean_gradient_over_every_clusters_tokens(spec, unroll):
  """With an identity optimizer and lr 1 the step subtracts the gradient: each cluster's own part moves by
  the gradient of its own mean loss, the shared trunk by that of the mean loss over all K clusters' tokens."""
  import jax.numpy as jnp
  import optax

  from hetlm_jax.model import PageLM
  from hetlm_jax.train.split import merge, partition
  from hetlm_jax.train.state import init_state
  from hetlm_jax.train.step import packed_loss_mask, stacked_step, token_nll

  rank = int(spec.split(":")[1]) if spec.startswith("adapters") else 0
  cfg = dataclasses.replace(
    TOP1, model=dataclasses.replace(TOP1.model, lora_rank=rank), cluster=ClusterConfig(cluster_params=spec)
  )
  k, model, tx = 2, PageLM(cfg.model), optax.identity()
  state = init_state(cfg, tx, jax.random.key(0), k)
  assert jax.tree.leaves(state.params["shared"]), "this split has a shared trunk"
  inputs, segments = _batch(k, cfg)
  segments[1, 3:] = 0  # cluster 1 has fewer real tokens than cluster 0
  weights = (segments > 0).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), k)
  new_params, _, _ = stacked_step(
    model, tx, spec, cfg.model.n_layers, unroll, 1.0, state.params, state.opt_state, inputs, segments, weights, keys
  )

  def sums(shared, cluster_c, c):
    nll = token_nll(model, merge(shared, cluster_c), inputs[c], segments[c], deterministic=True)
    mask = packed_loss_mask(jnp.asarray(segments[c]))
    return (nll * mask).sum(), mask.sum()

  own = lambda c: jax.tree.map(lambda x: x[c], state.params["cluster"])
  tokens = sum(float(sums(state.params["shared"], own(c), c)[1]) for c in range(k))
  total = lambda shared: sum(sums(shared, own(c), c)[0] for c in range(k)) / tokens
  expected_shared = jax.grad(total)(state.params["shared"])
  moved_shared = jax.tree.map(lambda a, b: a - b, state.params["shared"], new_params["shared"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), moved_shared, expected_shared)
  for c in range(k):
    mean_loss = lambda cluster_c: (
      sums(state.params["shared"], cluster_c, c)[0] / sums(state.params["shared"], cluster_c, c)[1]
    )
    expected = jax.grad(mean_loss)(own(c))
    moved = jax.tree.map(lambda a, b: a[c] - b[c], state.params["cluster"], new_params["cluster"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), moved, expected)
  assert set(partition(spec, cfg.model.n_layers, merge(*new_params.values()))["cluster"]) == set(new_params["cluster"])


@pytest.mark.parametrize("cfg", [CFG, TOP1], ids=["all", "top:1"])
def test_an_all_padding_step_leaves_that_cluster_exactly_as_it_was(cfg):
  """AdamW would otherwise apply momentum and weight decay to a cluster that has run out of data."""
  k = 2
  mesh = make_mesh(cfg, k, jax.devices()[:1])
  tx = make_optimizer(cfg)
  step = make_train_step(cfg, tx, mesh, abstract_state(cfg, tx, mesh, k))
  state = create_state(cfg, tx, mesh, k).replace(round_steps=np.int32(10))
  state, _ = step(state, *_batch(k, cfg, 0))  # non-zero moments in both clusters
  before = jax.device_get(state)
  assert np.abs(jax.tree.leaves(before.opt_state["cluster"])[1][1]).max() > 0
  inputs, segments = _batch(k, cfg, 1)
  segments[1] = 0
  after, metrics = step(state, inputs, segments)
  after = jax.device_get(after)
  assert metrics["tokens"][1] == 0
  for tree in ("params", "opt_state"):
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(a[1], b[1]),
      getattr(before, tree)["cluster"],
      getattr(after, tree)["cluster"],
    )
    assert any(
      not np.array_equal(a[0], b[0])
      for a, b in zip(
        jax.tree.leaves(getattr(before, tree)["cluster"]), jax.tree.leaves(getattr(after, tree)["cluster"])
      )
    )


def test_split_step_sharded_over_four_devices_equals_the_one_device_step():
  cfg = dataclasses.replace(TOP1, cluster=ClusterConfig(k=2, cluster_axis=2, cluster_params="top:1"))
  one, one_metrics = _run(
    dataclasses.replace(cfg, cluster=ClusterConfig(k=2, cluster_params="top:1")), 2, jax.devices()[:1]
  )
  four, four_metrics = _run(cfg, 2, jax.devices())
  for a, b in zip(one_metrics, four_metrics):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  # The shared gradient is reduced across devices in another order; Adam turns a near-zero gradient's
  # rounding into up to a few % of one step (lr 1e-2), hence atol 1e-4.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), one.params, four.params)


def test_stack_auto_unrolls_few_models_on_a_cpu_and_maps_over_many_or_sharded_ones():
  """The rule of --stack=auto (docs/BENCHMARKS.md, "Compile time"); an explicit --stack is obeyed."""
  from hetlm_jax.train.step import UNROLL_MAX_K, unrolled

  with_stack = lambda stack, axis=1: dataclasses.replace(
    CFG, train=dataclasses.replace(CFG.train, stack=stack), cluster=dataclasses.replace(CFG.cluster, cluster_axis=axis)
  )
  assert jax.default_backend() == "cpu"
  assert UNROLL_MAX_K == 1  # measured: unrolling K >= 2 does not win its compile time back in a typical run
  assert unrolled(with_stack("auto"), make_mesh(with_stack("auto"), 1), 1)
  for k in (2, 4, 8):
    assert not unrolled(with_stack("auto"), make_mesh(with_stack("auto"), k), k)
  assert not unrolled(with_stack("auto", 2), make_mesh(with_stack("auto", 2), 2), 1)  # K sharded over devices
  assert unrolled(with_stack("unroll"), make_mesh(with_stack("unroll"), 16), 16)
  assert not unrolled(with_stack("vmap"), make_mesh(with_stack("vmap"), 2), 2)
