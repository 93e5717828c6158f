"""Pages as text, scored in the page LMs' units: the arithmetic of issue 33's LLM baseline, for any subword LM.

A subword LM (a pretrained LLM, or one trained from scratch on the pages' text) sees each page as its text (a
documented map: a page's name, e.g. msnbc's category names, else its raw id), tokenized alone and followed by a
fixed separator tokenized alone, so that no subword merge crosses a page boundary; a session's end is the literal
marker SESSION_END and its start SESSION_START, tokens like the pages, so that the LLM is scored on exactly the
page LMs' target tokens (an unknown page is UNKNOWN_PAGE, an outcome token its own name). Then

  log p(page | history) = the sum of the log-probabilities of the page's subwords and of its separator,

never normalised by length, which is what a page LM's log p of one page token is comparable with (nats per page
token). The catalogue-renormalised NLL divides by every page of the vocabulary, log p(v) - logsumexp_v' log p(v'),
and the same scores rank the pages for HR@10 and NDCG@10 (eval/metrics.py). The history is left-truncated to the
page LM's number of pages of context, and `subwords` says how many subword tokens that was.

The LM enters as `logprob_fn(ids) -> [len(ids) - 1]`: the log-probability of each token of `ids` after the first,
given the ones before it. This module holds no model (llm/model.py loads one; llm/score.py batches the windows and
the candidates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import logsumexp

from hetlm_jax.data.tokenizer import BOS, EOS, PAD, UNK, PageTokenizer

SEPARATOR = "\n"  # after every page, tokenized alone
SESSION_START = "<start of session>"  # the text of the session-start token (BOS)
SESSION_END = "<end of session>"  # the text of the session-end token (EOS)
UNKNOWN_PAGE = "<unknown page>"  # the text of UNK: a page seen too rarely in training to have a token
# The zero-shot prompt's header: context, never scored.
HEADER = f"The pages a user of a website visited, one per line; {SESSION_START} and {SESSION_END} mark visits:\n"
_SPECIAL_TEXT = {BOS: SESSION_START, EOS: SESSION_END, UNK: UNKNOWN_PAGE}

LogprobFn = Callable[[Sequence[int]], np.ndarray]


def page_texts(tokenizer: PageTokenizer, names: dict[str, str] | None = None) -> list[str]:
  """The text of every token id of the page vocabulary: `names[page]` where the map names the page, else the page
  id itself; BOS, EOS and UNK their markers, an outcome token its name; PAD none ("": never scored)."""
  names = names or {}
  texts = []
  for i, token in enumerate(tokenizer.tokens):
    if i == PAD:
      texts.append("")
    elif i in _SPECIAL_TEXT:
      texts.append(_SPECIAL_TEXT[i])
    elif i < tokenizer.num_specials:
      texts.append(token)
    else:
      texts.append(str(names.get(token, token)))
  return texts


class PageSubwords:
  """Each page's subword ids (`encode` of its text alone, then of SEPARATOR alone), and a history's context."""

  def __init__(self, texts: Sequence[str], encode: Callable[[str], list[int]], header: str = HEADER):
    self.separator = list(encode(SEPARATOR))
    self.ids = [list(encode(text)) + self.separator if text else [] for text in texts]
    self.header = list(encode(header))
    if not self.header:
      raise ValueError("the prompt header must encode to at least one token: the first page is scored after it")

  def context(self, pages: Sequence[int], max_pages: int) -> list[int]:
    """The header, then the last `max_pages` pages of `pages` (the page LM's context, in pages), as subword ids."""
    kept = list(pages)[-max_pages:] if max_pages > 0 else []
    return self.header + [i for page in kept for i in self.ids[page]]

  def subwords(self, pages: Sequence[int], max_pages: int) -> int:
    """How many subword tokens the history's context is, without the header."""
    return len(self.context(pages, max_pages)) - len(self.header)


def page_logprob(logprob_fn: LogprobFn, context: Sequence[int], page_ids: Sequence[int]) -> float:
  """log p(page | context): the sum of the log-probabilities of the page's subwords and separator (`page_ids`)."""
  if not page_ids:
    raise ValueError("a page without text has no probability under a subword LM")
  ids = [*context, *page_ids]
  return float(np.sum(np.asarray(logprob_fn(ids))[len(context) - 1 :]))


def catalogue_logprobs(
  logprob_fn: LogprobFn, context: Sequence[int], subwords: PageSubwords, pages: Sequence[int]
) -> np.ndarray:
  """[len(pages)] log p(v | context) of each candidate page v, unnormalised (each a sum over its subwords)."""
  return np.array([page_logprob(logprob_fn, context, subwords.ids[v]) for v in pages])


def renormalised_nll(logp_P: np.ndarray, target: int) -> float:
  """-log of the target's probability among the candidates: -(log p(target) - logsumexp over every candidate)."""
  return float(logsumexp(logp_P) - logp_P[target])
