"""The same K models written as a PyTorch user would, for `hetlm bench`: pre-norm blocks, RoPE, tied
embeddings, segment masks for packed rows, AdamW with gradient clipping, the same shapes and batches.

Two ways: K eager models stepped in a Python loop, and one `torch.func` ensemble (`stack_module_state` +
`functional_call` + `vmap`) stepped by one AdamW over the stacked parameters. On a CPU, vmap has no
batching rule for flash attention and loops over it, with a warning; written out as two matmuls instead,
the ensemble was 3.5x slower at d_model 64, K=8 (measured), so it keeps the warning. The ensemble's memory
grows fast with size: 8.6 GB at d_model 256, K=8, and past the 24 GB machine at d_model 512, K=8.
"""

from __future__ import annotations

import copy
import importlib.util
import time

import numpy as np

from hetlm_jax.config import Config


def available() -> str | None:
  """None if torch imports, else why not."""
  if importlib.util.find_spec("torch") is None:
    return "PyTorch is not installed: pip install torch (or pip install -e '.[bench]' in the repository)"
  return None


def _build(cfg: Config, device: str):
  import torch
  import torch.nn.functional as F
  from torch import nn

  m = cfg.model

  def rope(x_BxAxTxH, positions_BxT):
    half = x_BxAxTxH.shape[-1] // 2
    freq = 1.0 / (10_000.0 ** (torch.arange(half, device=x_BxAxTxH.device, dtype=torch.float32) / half))
    angle = positions_BxT[:, None, :, None].float() * freq
    sin, cos = torch.sin(angle), torch.cos(angle)
    x1, x2 = x_BxAxTxH.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BxAxTxH.dtype)

  class Block(nn.Module):
    """model.Block in PyTorch."""

    def __init__(self):
      super().__init__()
      self.ln_attn, self.ln_mlp = nn.LayerNorm(m.d_model), nn.LayerNorm(m.d_model)
      self.q, self.k, self.v, self.o = (nn.Linear(m.d_model, m.d_model) for _ in range(4))
      self.up, self.down = nn.Linear(m.d_model, m.d_ff), nn.Linear(m.d_ff, m.d_model)
      self.drop = nn.Dropout(m.dropout)

    def forward(self, x, positions, mask):
      b, t, d = x.shape
      heads = lambda y: y.view(b, t, m.n_heads, m.head_dim).transpose(1, 2)
      h = self.ln_attn(x)
      q, k = rope(heads(self.q(h)), positions), rope(heads(self.k(h)), positions)
      a = F.scaled_dot_product_attention(q, k, heads(self.v(h)), attn_mask=mask)
      x = x + self.drop(self.o(a.transpose(1, 2).reshape(b, t, d)))
      return x + self.drop(self.down(F.gelu(self.up(self.ln_mlp(x)), approximate="tanh")))

  class PageLM(nn.Module):
    """model.PageLM in PyTorch (no LoRA, no output bias: the bench's models)."""

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(m.vocab_size, m.d_model)
      self.blocks = nn.ModuleList(Block() for _ in range(m.n_layers))
      self.ln_final = nn.LayerNorm(m.d_model)
      self.drop = nn.Dropout(m.dropout)

    def forward(self, tokens_BxT1, segments_BxT1, weights_BxT1):
      x_in, seg = tokens_BxT1[:, :-1], segments_BxT1[:, :-1]
      t = x_in.shape[1]
      t_T = torch.arange(t, device=x_in.device)
      starts = torch.where(torch.diff(seg, dim=1, prepend=torch.full_like(seg[:, :1], -1)) != 0, t_T, 0)
      positions = t_T - torch.cummax(starts, dim=1).values
      causal = torch.ones(t, t, dtype=torch.bool, device=x_in.device).tril()
      mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
      x = self.drop(self.embed(x_in))
      for block in self.blocks:
        x = block(x, positions, mask)
      logits = self.ln_final(x) @ self.embed.weight.T
      target_seg = segments_BxT1[:, 1:]
      w = torch.where(
        (target_seg == seg) & (target_seg != 0), weights_BxT1[:, 1:], torch.zeros_like(weights_BxT1[:, 1:])
      )
      nll = F.cross_entropy(logits.float().reshape(-1, m.vocab_size), tokens_BxT1[:, 1:].reshape(-1), reduction="none")
      return (nll * w.reshape(-1)).sum() / w.sum().clamp_min(1e-6)

  return PageLM


def measure(cfg: Config, k: int, batches: list[tuple[np.ndarray, ...]], warmup: int = 2) -> dict:
  """Median step time of each way over `batches` (numpy [K, B, T+1] tokens, segments, weights; the first
  `warmup` untimed), on CUDA if available (bf16 autocast when the JAX run computes in bf16), else CPU."""
  import torch
  from torch.func import functional_call, grad_and_value, stack_module_state, vmap

  device = "cuda" if torch.cuda.is_available() else "cpu"
  bf16 = device == "cuda" and cfg.model.compute_dtype == "bfloat16"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  torch.manual_seed(cfg.train.seed)
  PageLM = _build(cfg, device)
  models = [PageLM().to(device) for _ in range(k)]
  on_device = [
    (
      torch.as_tensor(tokens, device=device).long(),
      torch.as_tensor(segments, device=device),
      torch.as_tensor(weights, device=device),
    )
    for tokens, segments, weights in batches
  ]
  lr, wd, clip = cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.grad_clip
  autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

  optimizers = [torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=wd) for mod in models]

  def loop_step(tokens, segments, weights):
    for c, (mod, opt) in enumerate(zip(models, optimizers)):
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = mod(tokens[c], segments[c], weights[c])
      loss.backward()
      torch.nn.utils.clip_grad_norm_(mod.parameters(), clip)
      opt.step()

  params, buffers = stack_module_state(models)
  base = copy.deepcopy(models[0]).to("meta")
  stacked_opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=wd)

  def loss_one(p, b, tokens, segments, weights):
    with autocast():
      return functional_call(base, (p, b), (tokens, segments, weights))

  grads_fn = vmap(grad_and_value(loss_one), randomness="different")

  def func_step(tokens, segments, weights):
    grads, _ = grads_fn(params, buffers, tokens, segments, weights)
    norms_K = torch.sqrt(sum((g.float() ** 2).flatten(1).sum(1) for g in grads.values()))
    scale_K = (clip / (norms_K + 1e-6)).clamp(max=1.0)
    for name, p in params.items():
      p.grad = grads[name] * scale_K.view(-1, *([1] * (p.dim() - 1)))
    stacked_opt.step()

  result = {"torch_device": device, "torch_version": torch.__version__, "torch_bf16_autocast": bf16}
  for name, step in (("loop", loop_step), ("func", func_step)):
    times = []
    for i, batch in enumerate(on_device):
      sync()
      start = time.perf_counter()
      step(*batch)
      sync()
      if i >= warmup:
        times.append(time.perf_counter() - start)
    result[f"torch_{name}_step_s"] = float(np.median(times))
  return result
