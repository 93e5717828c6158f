"""hetlm_jax: heterogeneous page-level language models of browsing, in JAX/Flax.

`from hetlm_jax import Predictor` loads a trained run for new events (hetlm_jax/predict.py); importing the
package alone starts nothing heavy.
"""

__version__ = "0.1.0"
_PREDICT = ("NextPages", "Predictor", "Routing", "Scores", "predict_file")
__all__ = ["__version__", *_PREDICT]


def __getattr__(name: str):
  if name in _PREDICT:
    from hetlm_jax import predict
    return getattr(predict, name)
  raise AttributeError(f"module 'hetlm_jax' has no attribute {name!r}")
