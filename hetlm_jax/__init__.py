"""hetlm_jax: heterogeneous page-level language models of browsing, in JAX/Flax."""

__version__ = "0.1.0"
