"""Page vocabulary: one token per distinct page, after fixed specials and outcome-type tokens."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetlm_jax.errors import HetlmError, input_error
from hetlm_jax.files import location, replace_text

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
FILE_NAME = "tokenizer.json"
FORMAT = "hetlm_jax.PageTokenizer"
FORMAT_VERSION = 1


def outcome_token(name: str) -> str:
  """The token of outcome type `name`, e.g. <cart>."""
  return f"<{name}>"


class PageTokenizer:
  """Ids: specials 0..3, then one per outcome type (sorted), then pages by descending count."""

  PAD, UNK, BOS, EOS = PAD, UNK, BOS, EOS

  def __init__(self, outcome_types: Sequence[str], pages: Sequence[str]):
    """Prefer `fit` or `load`; `pages` must already be in id order."""
    self._outcomes = list(outcome_types)
    self._pages = pa.array(list(pages), pa.string())
    if len(set(self._outcomes)) != len(self._outcomes):
      raise ValueError("duplicate outcome types")
    if len(pc.unique(self._pages)) != len(self._pages):
      raise ValueError("duplicate pages")

  @classmethod
  def fit(
    cls,
    pages: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str],
    outcome_types: Iterable[str] = (),
    min_count: int = 1,
    max_vocab: int | None = None,
  ) -> PageTokenizer:
    """Vocabulary of `pages` (one entry per event); rare or overflowing pages will map to UNK.

    `max_vocab` bounds the whole vocabulary, specials and outcome tokens included.
    """
    counts = pc.value_counts(_as_strings(pages).drop_null())
    return cls._from_counts(outcome_types, counts.field("values"), counts.field("counts"), min_count, max_vocab)

  @classmethod
  def from_counts(cls, pages: pa.Array, counts: pa.Array, outcome_types: Iterable[str] = ()) -> PageTokenizer:
    """`fit` on events whose distinct pages are `pages`, each seen `counts` times (e.g. summed over the processes
    of a job, each of which counted only its own users' events): the same tokenizer, byte for byte."""
    return cls._from_counts(outcome_types, pages, counts, 1, None)

  @classmethod
  def _from_counts(
    cls, outcome_types: Iterable[str], pages: pa.Array, counts: pa.Array, min_count: int, max_vocab: int | None
  ) -> PageTokenizer:
    # Lower-cased like build_sequences matches event types, so "Cart" and "cart" are one token.
    outcomes = sorted({str(o).strip().lower() for o in outcome_types})
    n_fixed = len(SPECIALS) + len(outcomes)
    if max_vocab is not None and max_vocab < n_fixed:
      raise HetlmError(f"max_vocab={max_vocab} is smaller than the {n_fixed} special and outcome tokens")
    table = pa.table({"page": pages, "count": counts})
    table = table.filter(pc.greater_equal(table["count"], max(int(min_count), 1)))
    # Ties broken by the page string so ids do not depend on row order.
    table = table.sort_by([("count", "descending"), ("page", "ascending")])
    if max_vocab is not None:
      table = table.slice(0, max_vocab - n_fixed)
    return cls(outcomes, table["page"].to_pylist())

  def restrict(
    self, counts_V: np.ndarray, min_count: int = 1, max_vocab: int | None = None
  ) -> tuple[PageTokenizer, np.ndarray]:
    """The tokenizer `fit` would give on events with these per-token counts (e.g. of training data
    only), and the [V] map from this tokenizer's ids to its ids: pages it drops map to UNK."""
    counts_V = np.asarray(counts_V, np.int64)
    if counts_V.shape != (self.vocab_size,):
      raise ValueError(f"counts_V must have shape ({self.vocab_size},), not {counts_V.shape}")
    new = self._from_counts(self._outcomes, self._pages, counts_V[self.num_specials :], min_count, max_vocab)
    map_V = np.concatenate([np.arange(self.num_specials, dtype=np.int32), new.encode_pages(self._pages)])
    return new, map_V

  @property
  def vocab_size(self) -> int:
    """V: special tokens, outcome tokens and pages."""
    return len(SPECIALS) + len(self._outcomes) + len(self._pages)

  @property
  def num_specials(self) -> int:
    """Ids below this are specials or outcome tokens; pages start here."""
    return len(SPECIALS) + len(self._outcomes)

  @property
  def outcome_types(self) -> list[str]:
    """The outcome types (event_type values other than views) with a token of their own."""
    return list(self._outcomes)

  @property
  def tokens(self) -> list[str]:
    """All token strings in id order."""
    return list(SPECIALS) + [outcome_token(o) for o in self._outcomes] + self._pages.to_pylist()

  def outcome_id(self, name: str) -> int:
    """The token id of outcome type `name` (KeyError for an unknown one)."""
    try:
      return len(SPECIALS) + self._outcomes.index(name)
    except ValueError:
      raise KeyError(f"unknown outcome type {name!r}; known: {self._outcomes}") from None

  def outcome_ids(self, names: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str]) -> np.ndarray:
    """Outcome token id per name (int32); names not in the vocabulary or null give UNK."""
    return self._lookup(names, pa.array(self._outcomes, pa.string()), len(SPECIALS))

  def encode_pages(self, pages: pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str]) -> np.ndarray:
    """Token id per page (int32); unseen pages give UNK."""
    # Looked up among pages only, so a page literally named "<s>" never becomes BOS.
    return self._lookup(pages, self._pages, self.num_specials)

  def decode(self, ids: Iterable[int] | np.ndarray) -> list[str]:
    """The token names of `ids`."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise IndexError(f"token ids must lie in [0, {self.vocab_size})")
    return self._token_array[ids].tolist()

  @functools.cached_property
  def _token_array(self) -> np.ndarray:
    return np.asarray(self.tokens, dtype=object)

  def save(self, path: str | os.PathLike) -> str:
    """Writes tokenizer.json (into `path` if it is a directory); returns the file written."""
    path = _json_path(path)
    doc = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "specials": list(SPECIALS),
      "outcome_types": self._outcomes,
      "pages": self._pages.to_pylist(),
    }
    replace_text(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> PageTokenizer:
    """The tokenizer saved at `path` (a tokenizer.json, or the folder holding one); HetlmError if unreadable."""
    path = _json_path(path)
    try:
      doc = json.loads(location(path, "tokenizer").read_text(encoding="utf-8"))
    except FileNotFoundError:
      raise input_error(path, "no such file") from None
    except (OSError, ValueError) as e:
      raise input_error(path, f"not a readable tokenizer file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
      raise input_error(path, f"not a {FORMAT} file")
    if doc.get("version") != FORMAT_VERSION:
      raise input_error(
        path, f"tokenizer format version {doc.get('version')} is not supported (expected {FORMAT_VERSION})"
      )
    if doc.get("specials") != list(SPECIALS):
      raise input_error(path, f"special tokens {doc.get('specials')} differ from {list(SPECIALS)}")
    try:
      return cls(doc["outcome_types"], doc["pages"])
    except (KeyError, TypeError, ValueError, pa.ArrowException) as e:
      raise input_error(path, f"malformed tokenizer file ({e})") from None

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, PageTokenizer):
      return NotImplemented
    return self._outcomes == other._outcomes and self._pages.equals(other._pages)

  __hash__ = None

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return f"PageTokenizer(vocab_size={self.vocab_size}, outcome_types={self._outcomes}, pages={len(self._pages)})"

  @staticmethod
  def _lookup(values, vocab: pa.Array, offset: int) -> np.ndarray:
    idx = pc.index_in(_as_strings(values), value_set=vocab)
    ids = pc.fill_null(pc.add(idx.cast(pa.int32()), np.int32(offset)), np.int32(UNK))
    return np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int32)


def _as_strings(values) -> pa.Array | pa.ChunkedArray:
  if isinstance(values, pa.ChunkedArray | pa.Array):
    arr = values
  else:
    values = np.asarray(values)
    arr = pa.array(values.astype(str) if values.dtype.kind not in "OU" else values)
  if pa.types.is_dictionary(arr.type):
    arr = arr.cast(arr.type.value_type)
  return arr if arr.type == pa.string() else arr.cast(pa.string())


def _json_path(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return path if path.endswith(".json") else f"{path.rstrip('/')}/{FILE_NAME}"
