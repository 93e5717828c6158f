"""Model FLOPs per trained token, and the peak they are divided by for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from hetlm_jax.config import ModelConfig

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets, by the start of jax's device_kind.
PEAK_BF16 = {
  "NVIDIA H200": 989e12,
  "NVIDIA H100": 989e12,
  "NVIDIA A100": 312e12,
  "NVIDIA L4": 121e12,
  "NVIDIA A10G": 70e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def model_flops_per_token(cfg: ModelConfig) -> float:
  """Training FLOPs per token as MaxText and Levanter count them: 6 x the matmul parameters (forward 2,
  backward 4) plus attention's two [T, T] products over the full map, 6 x 2 x T x D per layer; the output
  layer counts (d_model x vocab), the embedding lookup and norms do not."""
  d, f, v, r, t = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.lora_rank, cfg.context
  per_layer = 4 * d * d + 2 * d * f + r * (4 * 2 * d + 2 * (d + f))
  matmul_params = cfg.n_layers * per_layer + d * v
  return 6.0 * matmul_params + 6.0 * cfg.n_layers * 2 * t * d


def peak_flops(device, steps: int = 5) -> tuple[float, str]:
  """(FLOP/s, how it was obtained): the data-sheet bf16 peak of a known GPU or TPU; otherwise (CPU) a float32
  matmul measured now on that device."""
  kind = device.device_kind
  for name, peak in PEAK_BF16.items():
    if kind.startswith(name):
      return peak, f"bf16 dense data-sheet peak of {name}"
  n = 2048
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(times)), f"float32 {n}x{n} matmul measured on {kind}"
