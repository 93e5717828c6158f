"""Which parameters each cluster owns (`--cluster_params`): a model's parameters split into one shared
copy and a part stacked on a leading K axis.

Every params pytree of a model family is `{"shared": tree, "cluster": tree}`: the two trees hold
disjoint leaves of the model's parameter dict, and merging them gives one model's parameters. With
`all` the shared tree is empty (K whole models); with `head` each cluster owns the final norm and
the output bias (and the output projection when embeddings are untied); `top:N` adds the last N
blocks; `adapters:R` adds LoRA factors of rank R over a shared trunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from hetlm_jax.config import ModelConfig
from hetlm_jax.model import init_params

_HEAD = ("ln_final", "output_bias", "head")


def owned_by_cluster(spec: str, n_layers: int, path: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` (e.g. ("block_1", "q", "kernel")) is cluster-specific under `spec`."""
  kind, _, n = spec.partition(":")
  if kind == "all" or path[0] in _HEAD:
    return True
  if kind == "top" and path[0].startswith("block_"):
    return int(path[0].split("_")[1]) >= n_layers - int(n)
  return kind == "adapters" and "_lora_" in path[1]


def partition(spec: str, n_layers: int, params) -> dict:
  """One model's parameter dict → {"shared", "cluster"} (no K axis added)."""
  flat = traverse_util.flatten_dict(params)
  parts = {"shared": {}, "cluster": {}}
  for path, x in flat.items():
    parts["cluster" if owned_by_cluster(spec, n_layers, path) else "shared"][path] = x
  return {name: traverse_util.unflatten_dict(part) for name, part in parts.items()}


def merge(shared, cluster) -> dict:
  """The parameter dict of one model from the shared tree and that model's own tree."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(shared), **traverse_util.flatten_dict(cluster)})


def num_models(params) -> int:
  """K, the models of a split, stacked family."""
  return jax.tree.leaves(params["cluster"])[0].shape[0]


def model_params(params, k) -> dict:
  """The full parameter dict of model k of a split, stacked family."""
  return merge(params["shared"], jax.tree.map(lambda x: x[k], params["cluster"]))


def map_models(fn, unroll: bool = False):
  """`jax.vmap(fn)` over the leading K axis of every argument; with `unroll`, K calls of `fn` traced into
  the same program and their results stacked. On a CPU the unrolled form is faster (measured in
  docs/BENCHMARKS.md): XLA runs K independent small graphs side by side instead of batching every matmul."""
  if not unroll:
    return jax.vmap(fn)

  def mapped(*args):
    k = jax.tree.leaves(args)[0].shape[0]
    outs = [fn(*jax.tree.map(lambda x, i=i: x[i], args)) for i in range(k)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return mapped


def per_model(fn, unroll: bool = False):
  """`fn(one_model_params, *args)` mapped over the K models of a split family, the args shared by all."""

  def mapped(params, *args):
    return map_models(lambda cluster: fn(merge(params["shared"], cluster), *args), unroll)(params["cluster"])

  return mapped


def part_sizes(cfg: ModelConfig, spec: str) -> tuple[int, int]:
  """(shared, per-cluster) parameter counts of one model under `spec`."""
  shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
  parts = partition(spec, cfg.n_layers, shapes)
  return tuple(sum(x.size for x in jax.tree.leaves(parts[name])) for name in ("shared", "cluster"))
