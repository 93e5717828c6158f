"""hetlm_jax: heterogeneous page-level language models of browsing, in JAX/Flax.

`from hetlm_jax import Predictor` loads a trained run for new events (hetlm_jax/predict.py); importing the
package alone starts nothing heavy.

Shape suffixes, the one legend every file follows: an array's name ends with its shape, one letter per axis
joined by x, so `nll_KxU` holds K models by U users and `x_BxTxD` B rows by T positions by D features. A letter
means the same axis everywhere:

  U  users                          K  models (clusters; a Markov mixture's components)
  R  a subset of users (validation users, a selection, a batch's scored users)
  B  batch rows (training, scoring, decoding)   T  positions in a row (T1: T + 1 tokens)   BT  B x T flattened
  N  tokens or positions laid end to end (all users' sequences; rows flattened)
  E  events of the log      G  sessions        L  text lines of a file      W  windows of a sequence
  X  training examples (a window in a cluster's batch)     J  steps of a metrics window
  V  the page vocabulary    C  candidate pages    P  distinct (previous, next) pairs    Q  sampled negatives
  Y  top pages predicted    O  generated tokens   S  key positions (the KV cache's slots)
  D  model width    F  feed-forward width    A  attention heads    H  head width (H2: H / 2)    KD  K x D
  M  chunks of the output layer    Z  bootstrap resamples    1  a broadcast axis of size 1
"""

__version__ = "0.1.0"
_PREDICT = ("Continuations", "NextPages", "Predictor", "Routing", "Scores", "predict_file")
__all__ = ["HetlmError", "Sampling", "__version__", *_PREDICT]


def __getattr__(name: str):
  if name in _PREDICT:
    from hetlm_jax import predict

    return getattr(predict, name)
  if name == "Sampling":
    from hetlm_jax.eval.generate import Sampling

    return Sampling
  if name == "HetlmError":
    from hetlm_jax.errors import HetlmError

    return HetlmError
  raise AttributeError(f"module 'hetlm_jax' has no attribute {name!r}")
