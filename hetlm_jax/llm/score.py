"""The LLM scored in the page LMs' units, in batches (llm/text.py says what is scored; this is how).

`window_batches` cuts the page LMs' own windows (data.sequences.all_windows: the same contexts, the same scored
positions) into batches, `texts_of` makes a batch's windows subword ids, `token_logprobs` gives each window's
scored page tokens' log p (the sum of their subwords'); `target_nll` adds them up per user. `catalogue_logprobs`
scores every page of the catalogue after one context: the context runs once, its KV cache is repeated over a
batch of candidate pages.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np

from hetlm_jax.data.sequences import UserSequences, all_windows
from hetlm_jax.errors import HetlmError
from hetlm_jax.llm.model import LLM
from hetlm_jax.llm.text import PageSubwords
from hetlm_jax.train.metrics import Progress

BATCH = 16  # windows per scoring batch
CANDIDATES = 256  # candidate pages per batch after a context


def window_text(subwords: PageSubwords, tokens: np.ndarray, scored: int) -> tuple[list[int], np.ndarray]:
  """The subword ids of a window of page tokens (the header first), and [len(tokens) - scored, 2] the span of
  subword positions of each scored token (tokens[scored:])."""
  ids = list(subwords.header)
  spans = []
  for i, token in enumerate(tokens):
    page = subwords.ids[int(token)]
    if not page:
      raise ValueError(f"token {int(token)} has no text: it cannot be scored by a subword LM")
    if i >= scored:
      spans.append((len(ids), len(ids) + len(page)))
    ids.extend(page)
  return ids, np.array(spans, np.int64).reshape(-1, 2)


def window_batches(seqs: UserSequences, part: str, width: int, batch: int = BATCH):
  """The page LMs' windows of `part` (all_windows: owner_W, start_W, length_W, scored_W), and batches of `batch`
  window indices, by length so that a batch pads little."""
  owner_W, start_W, length_W, scored_W = all_windows(seqs, part, width)
  order = np.argsort(length_W, kind="stable")
  batches = [order[i : i + batch] for i in range(0, len(order), batch)]
  return owner_W, start_W, length_W, scored_W, batches


def texts_of(seqs: UserSequences, subwords: PageSubwords, windows, start_W, length_W, scored_W):
  """[(ids, spans)] of `windows` (built per batch: only the rows in hand)."""
  return [
    window_text(subwords, seqs.tokens[start_W[w] : start_W[w] + length_W[w]], int(scored_W[w] - start_W[w]))
    for w in windows
  ]


def padded(llm: LLM, texts: list[tuple[list[int], np.ndarray]]):
  """input ids and attention mask [B, L] (right padding) on the LLM's device."""
  import torch

  longest = max(len(ids) for ids, _ in texts)
  if longest > llm.max_positions:
    raise HetlmError(
      f"--llm={llm.spec}: a window of the page LM's --context is {longest} subwords, more than the model's "
      f"{llm.max_positions} positions: lower --context"
    )
  ids = torch.zeros((len(texts), longest), dtype=torch.long)
  mask = torch.zeros((len(texts), longest), dtype=torch.long)
  for b, (row, _) in enumerate(texts):
    ids[b, : len(row)] = torch.tensor(row)
    mask[b, : len(row)] = 1
  return ids.to(llm.device), mask.to(llm.device)


def subword_logprobs(llm: LLM, ids, mask):
  """[B, L] log p of each subword given the ones before it (0 at position 0 and at padding), a torch tensor."""
  import torch

  logits = llm.model(input_ids=ids, attention_mask=mask).logits.float()
  lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
  return torch.nn.functional.pad(lp, (1, 0))


def token_logprobs(lp_BxL: np.ndarray, texts) -> list[np.ndarray]:
  """Each window's scored page tokens' log p: the sum of their subwords' (by `spans`)."""
  out = []
  for b, (_, spans) in enumerate(texts):
    cum = np.concatenate([[0.0], np.cumsum(lp_BxL[b], dtype=np.float64)])
    out.append(cum[spans[:, 1]] - cum[spans[:, 0]])
  return out


def target_nll(llm: LLM, seqs: UserSequences, width: int, subwords: PageSubwords, label: str | None = None):
  """([U] NLL sums of each user's held-out target tokens, [U] how many, [U] subwords of the context before the
  first target token), on the page LMs' target windows of `width` tokens (context + 1)."""
  import torch

  owner_W, start_W, length_W, scored_W, batches = window_batches(seqs, "target", width)
  nll_U, tokens_U = np.zeros(seqs.num_users), np.zeros(seqs.num_users, np.int64)
  progress = Progress(len(batches), label, every=10)
  llm.model.eval()
  with torch.no_grad():
    for i, windows in enumerate(batches):
      texts = texts_of(seqs, subwords, windows, start_W, length_W, scored_W)
      lp = subword_logprobs(llm, *padded(llm, texts)).cpu().numpy()
      for w, logp in zip(windows, token_logprobs(lp, texts)):
        nll_U[owner_W[w]] -= logp.sum()
        tokens_U[owner_W[w]] += len(logp)
      progress.update(i + 1)
  progress.close()
  first_W = np.flatnonzero(np.r_[True, owner_W[1:] != owner_W[:-1]])  # each user's first window: window_bounds'
  context_U = np.zeros(seqs.num_users, np.int64)
  for w in first_W:
    tokens = seqs.tokens[start_W[w] : scored_W[w]]
    context_U[owner_W[w]] = sum(len(subwords.ids[int(t)]) for t in tokens)
  return nll_U, tokens_U, context_U


def _cache_argument(model) -> str:
  """The forward's name for a KV cache: `cache` in transformers 5.x, `past_key_values` before."""
  base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: the one inside
  return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _repeat_cache(cache, n: int):
  """A copy of a KV cache, repeated `n` times along the batch."""
  repeated = copy.deepcopy(cache)
  repeated.batch_repeat_interleave(n)
  return repeated


def catalogue_logprobs(llm: LLM, context: list[int], subwords: PageSubwords, pages: np.ndarray) -> np.ndarray:
  """[len(pages)] log p(page | context), each the sum of its subwords' (unnormalised): the context runs once and its
  KV cache serves every batch of candidates."""
  import torch

  llm.model.eval()
  with torch.no_grad():
    out = llm.model(input_ids=torch.tensor([context], device=llm.device), use_cache=True)
    cache, argument = getattr(out, "cache", None) or out.past_key_values, _cache_argument(llm.model)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = []
    for lo in range(0, len(pages), CANDIDATES):
      chunk = [subwords.ids[int(v)] for v in pages[lo : lo + CANDIDATES]]
      if len(context) + max(map(len, chunk)) > llm.max_positions:
        raise HetlmError(f"--llm={llm.spec}: a context and a page are more than the model's positions: lower --context")
      ids = torch.zeros((len(chunk), max(map(len, chunk))), dtype=torch.long, device=llm.device)
      for b, row in enumerate(chunk):
        ids[b, : len(row)] = torch.tensor(row)
      logits = llm.model(input_ids=ids, **{argument: _repeat_cache(cache, len(chunk))}).logits
      lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
      lengths = torch.tensor([len(row) for row in chunk], device=llm.device)
      keep = torch.arange(ids.shape[1] - 1, device=llm.device)[None] < (lengths[:, None] - 1)
      scores.append((first[ids[:, 0]] + (lp * keep).sum(dim=1)).cpu().numpy())
  return np.concatenate(scores).astype(np.float64)
