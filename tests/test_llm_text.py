"""Pages as text for a subword LM (llm/text.py), on a toy LM whose every probability can be computed by hand:
a bigram table over a small subword vocabulary, and a greedy longest-match tokenizer whose vocabulary has a subword
that crosses a page boundary ("a\\n"), so a tokenizer run over the joined text would merge across the separator."""

import numpy as np
import pytest
from scipy.special import log_softmax

from hetlm_jax.data.tokenizer import EOS, PageTokenizer
from hetlm_jax.eval import metrics as M
from hetlm_jax.llm.text import (
  SEPARATOR,
  SESSION_END,
  PageSubwords,
  catalogue_logprobs,
  page_logprob,
  page_texts,
  renormalised_nll,
)

SUBWORDS = [*"Hab", "ab", "\n", "a\n", *"c<> endofsitrukwpg"]


def encode(text: str) -> list[int]:
  """Greedy longest match over SUBWORDS (a stand-in for BPE: it merges whatever the vocabulary has)."""
  ids, at = [], 0
  while at < len(text):
    match = max((s for s in SUBWORDS if text.startswith(s, at)), key=len)
    ids.append(SUBWORDS.index(match))
    at += len(match)
  return ids


TABLE = np.random.default_rng(0).normal(size=(len(SUBWORDS), len(SUBWORDS)))


def bigram_logprobs(ids) -> np.ndarray:
  """log p(ids[i+1] | ids[i]) under TABLE: the toy LM's `logprob_fn`."""
  ids = np.asarray(ids)
  return log_softmax(TABLE[ids[:-1]], axis=1)[np.arange(len(ids) - 1), ids[1:]]


@pytest.fixture
def subwords():
  tokenizer = PageTokenizer([], ["/a", "/b", "/c"])
  texts = page_texts(tokenizer, {"/a": "a", "/b": "ab", "/c": "c"})
  return tokenizer, PageSubwords(texts, encode, header="H")


def test_each_page_is_tokenized_alone_so_no_subword_crosses_a_separator(subwords):
  tokenizer, sw = subwords
  a, b = tokenizer.encode_pages(["/a", "/b"])
  assert sw.ids[a] == [SUBWORDS.index("a"), SUBWORDS.index("\n")]
  assert sw.context([a, b], 8) == encode("H") + encode("a") + encode("\n") + encode("ab") + encode("\n")
  assert encode("Ha\nab\n") != sw.context([a, b], 8)  # the joined text would merge "a\n" across the page boundary
  assert page_texts(tokenizer)[EOS] == SESSION_END and sw.ids[EOS] == encode(SESSION_END) + encode(SEPARATOR)


def test_a_pages_log_probability_is_the_sum_of_its_subwords_and_separator_by_hand(subwords):
  tokenizer, sw = subwords
  a, b = tokenizer.encode_pages(["/a", "/b"])
  context = sw.context([a], 8)  # H a \n
  logp = page_logprob(bigram_logprobs, context, sw.ids[b])  # then "ab" "\n", never divided by its length
  h, sa, nl, sab = (SUBWORDS.index(s) for s in ("H", "a", "\n", "ab"))
  assert context == [h, sa, nl]
  step = lambda x, y: log_softmax(TABLE[x])[y]
  assert logp == pytest.approx(step(nl, sab) + step(sab, nl))


def test_on_a_three_page_vocabulary_the_renormalised_probabilities_sum_to_1_and_match_brute_force(subwords):
  tokenizer, sw = subwords
  pages = tokenizer.encode_pages(["/a", "/b", "/c"])
  context = sw.context([pages[2], pages[0]], 8)
  logp_P = catalogue_logprobs(bigram_logprobs, context, sw, pages)
  probs = np.exp([-renormalised_nll(logp_P, i) for i in range(3)])
  assert probs.sum() == pytest.approx(1.0)

  def joint(ids):  # brute force: the product of the bigram probabilities of the page's subwords after the context
    p, prev = 1.0, context[-1]
    for i in ids:
      p *= np.exp(log_softmax(TABLE[prev])[i])
      prev = i
    return p

  brute = np.array([joint(sw.ids[v]) for v in pages])
  np.testing.assert_allclose(probs, brute / brute.sum(), rtol=1e-10)
  # the same scores rank the catalogue for HR@k and NDCG@k
  logp_V = np.full(tokenizer.vocab_size, -np.inf)
  logp_V[pages] = logp_P
  candidate_V = np.zeros(tokenizer.vocab_size, bool)
  candidate_V[pages] = True
  best = int(pages[np.argmax(brute)])
  assert M.ranking_metrics(logp_V[None], np.array([best]), candidate_V)["hr@1"][0] == 1.0


def test_the_context_is_the_page_lms_number_of_pages_left_truncated_and_its_subwords_are_counted(subwords):
  tokenizer, sw = subwords
  a, b, c = tokenizer.encode_pages(["/a", "/b", "/c"])
  assert sw.context([a, b, c], 2) == encode("H") + sw.ids[b] + sw.ids[c]
  assert sw.subwords([a, b, c], 2) == len(sw.ids[b]) + len(sw.ids[c]) == 4
  assert sw.context([a, b, c], 0) == encode("H")
  with pytest.raises(ValueError, match="header"):
    PageSubwords(page_texts(tokenizer, {"/a": "a", "/b": "ab", "/c": "c"}), encode, header="")
