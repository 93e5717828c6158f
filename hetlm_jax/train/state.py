"""Stacked train state, the optimizer, and the device mesh.

K cluster models share one pytree, split as train/split.py says: the cluster-specific parameters
and their optimizer state are built under `jax.vmap` (a leading K axis), the shared ones once, so one
compiled step trains all of them. The mesh has axes ('cluster', 'data'): K is split over 'cluster',
each batch's B axis over 'data'; the shared part is replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hetlm_jax.config import Config
from hetlm_jax.errors import HetlmError
from hetlm_jax.model import init_params
from hetlm_jax.train.split import partition


@flax.struct.dataclass
class TrainState:
  """The K stacked models, their optimizer and where the schedule stands: what a train step maps to the next."""

  step: jax.Array  # global step over all rounds; the data order and dropout keys derive from it
  round_start: jax.Array  # global step at which the current reassignment round began
  round_steps: jax.Array  # steps in the current round; the learning-rate schedule spans them
  round_lr: jax.Array  # [3] float32: the round's learning rate at its start, after warmup, and at its end
  params: Any  # {"shared": one copy, "cluster": leading K axis on every leaf}
  opt_state: Any  # the same split: {"shared": ..., "cluster": ...}


def cluster_spec(cfg: Config, k: int) -> str:
  """--cluster_params of a family of k models; a single model (k=1) owns all of its parameters."""
  return cfg.cluster.cluster_params if k > 1 else "all"


def make_mesh(cfg: Config, k: int, devices=None) -> Mesh:
  """Mesh ('cluster', 'data'); a single model (k=1, e.g. a baseline) puts every device on 'data'."""
  devices = list(jax.devices() if devices is None else devices)
  n_cluster = cfg.cluster.cluster_axis if k > 1 else 1
  if len(devices) % n_cluster or k % n_cluster:
    raise HetlmError(f"--cluster_axis={n_cluster} must divide both the device count ({len(devices)}) and --k={k}")
  n_data = len(devices) // n_cluster
  if cfg.train.batch_size % n_data:
    raise HetlmError(
      f"--batch_size={cfg.train.batch_size} must be a multiple of the {n_data} devices on the 'data' mesh axis"
    )
  return Mesh(np.array(devices).reshape(n_cluster, n_data), ("cluster", "data"))


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW without its learning rate, which `learning_rate` applies (it depends on the round)."""
  t = cfg.train
  # Norms, biases and learned positions are not decayed.
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
    lambda path, x: x.ndim >= 2 and "pos_embed" not in jax.tree_util.keystr(path), params
  )
  return optax.chain(
    optax.clip_by_global_norm(t.grad_clip),
    optax.scale_by_adam(b1=0.9, b2=0.98),
    optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
  )


_SCHEDULE_RESOLUTION = 10_000


def cold_lr(t) -> np.ndarray:
  """A round trained from scratch (or restarted at full rate): warmup from 1% of --learning_rate to it, then
  cosine decay to 5% of it."""
  return np.array([0.01, 1.0, 0.05], np.float32) * t.learning_rate


def decay_lr(start: float) -> np.ndarray:
  """A round that goes on from a trained model: no warmup (the rate holds at `start` for the warmup fraction),
  then cosine decay to 5% of `start`."""
  return np.array([start, start, 0.05 * start], np.float32)


def schedule_lr(warmup_frac: float, fraction, round_lr):
  """The learning rate a `fraction` of the way through a round whose (start, peak, end) rates are `round_lr`:
  linear warmup from start to peak over `warmup_frac`, then cosine decay from peak to end (optax's shapes,
  scaled between the round's rates, which the state carries, so rounds differ without recompiling)."""
  warmup = int(warmup_frac * _SCHEDULE_RESOLUTION)
  s = jnp.clip(jnp.asarray(fraction) * _SCHEDULE_RESOLUTION, 0, _SCHEDULE_RESOLUTION).astype(jnp.int32)
  ramp = optax.linear_schedule(0.0, 1.0, max(warmup, 1))(s)
  decay = optax.cosine_decay_schedule(1.0, _SCHEDULE_RESOLUTION - warmup)(jnp.maximum(s - warmup, 0))
  start, peak, end = round_lr[0], round_lr[1], round_lr[2]
  return jnp.where(s < warmup, start + (peak - start) * ramp, end + (peak - end) * decay)


def learning_rate(cfg: Config, state: TrainState) -> jax.Array:
  """Warmup then cosine decay over each round (rounds differ in length, so by fraction), between the
  round's rates (`round_lr`: see cold_lr and decay_lr)."""
  fraction = (state.step - state.round_start) / jnp.maximum(state.round_steps, 1)
  return schedule_lr(cfg.train.warmup_frac, fraction, state.round_lr)


def split_state(tx: optax.GradientTransformation, params, round_lr) -> TrainState:
  """A fresh state (step 0, new optimizer moments) around split, stacked `params`."""
  zero = jnp.zeros((), jnp.int32)
  opt_state = {"shared": tx.init(params["shared"]), "cluster": jax.vmap(tx.init)(params["cluster"])}
  return TrainState(
    step=zero,
    round_start=zero,
    round_steps=zero,
    round_lr=jnp.asarray(round_lr, jnp.float32),
    params=params,
    opt_state=opt_state,
  )


def init_state(cfg: Config, tx: optax.GradientTransformation, key: jax.Array, k: int) -> TrainState:
  """K independently initialised models; the shared part is model 0's."""
  full = jax.vmap(lambda key: init_params(cfg.model, key))(jax.random.split(key, k))
  parts = partition(cluster_spec(cfg, k), cfg.model.n_layers, full)
  return split_state(
    tx, {"shared": jax.tree.map(lambda x: x[0], parts["shared"]), "cluster": parts["cluster"]}, cold_lr(cfg.train)
  )


def state_shardings(mesh: Mesh, abstract_state: TrainState) -> TrainState:
  """The K axis of every stacked leaf goes on 'cluster'; the shared part and the step counter are replicated."""
  stacked, replicated = NamedSharding(mesh, P("cluster")), NamedSharding(mesh, P())
  split = lambda tree: {
    "shared": jax.tree.map(lambda _: replicated, tree["shared"]),
    "cluster": jax.tree.map(lambda x: stacked if x.ndim else replicated, tree["cluster"]),
  }
  return TrainState(
    step=replicated,
    round_start=replicated,
    round_steps=replicated,
    round_lr=replicated,
    params=split(abstract_state.params),
    opt_state=split(abstract_state.opt_state),
  )


def create_state(cfg: Config, tx, mesh: Mesh, k: int) -> TrainState:
  """Initialises the stacked state directly in its sharded layout."""
  key = jax.random.key(cfg.train.seed)
  init = functools.partial(init_state, cfg, tx, k=k)
  abstract = jax.eval_shape(init, key)
  return jax.jit(init, out_shardings=state_shardings(mesh, abstract))(key)


def abstract_state(cfg: Config, tx, mesh: Mesh, k: int) -> TrainState:
  """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto this mesh."""
  abstract = jax.eval_shape(functools.partial(init_state, cfg, tx, k=k), jax.random.key(0))
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings(mesh, abstract)
  )
