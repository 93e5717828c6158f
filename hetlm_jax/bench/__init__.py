"""hetlm bench: the stacked step against a per-cluster loop and PyTorch, MFU, scoring and input figures."""

from hetlm_jax.bench.run import run_bench

__all__ = ["run_bench"]
