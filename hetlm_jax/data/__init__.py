"""Event readers, the page tokenizer and per-user sequences; SAMPLE_PATH is a packaged MSNBC sample."""

from pathlib import Path

from hetlm_jax.data.readers import FORMATS, detect_format, normalise_events, read_events
from hetlm_jax.data.sequences import (
  VIEW_EVENTS,
  UserSequences,
  build_sequences,
  history_windows,
  outcome_types,
  target_windows,
)
from hetlm_jax.data.tokenizer import BOS, EOS, PAD, UNK, PageTokenizer

# 20,000 users of the UCI MSNBC data set; see samples/README.md.
SAMPLE_PATH = Path(__file__).resolve().parent / "samples" / "msnbc_sample.seq.gz"

__all__ = [
  "BOS",
  "EOS",
  "FORMATS",
  "PAD",
  "SAMPLE_PATH",
  "UNK",
  "VIEW_EVENTS",
  "PageTokenizer",
  "UserSequences",
  "build_sequences",
  "detect_format",
  "history_windows",
  "normalise_events",
  "outcome_types",
  "read_events",
  "target_windows",
]
