"""The LLM baseline as a model family of the evaluation: trained (or zero-shot), then scored per user like the others.

`LLMBaseline(cfg, tokenizer, workdir)`: `train` loads --llm, wraps it in LoRA or not, and fine-tunes it
(llm/finetune.py) or reads the finished fine-tune from WORKDIR/llm/; `per_user` gives its per-user figures on the
evaluated users (the NLL per target token on the page LMs' own windows; on a fixed draw of --llm_rank_users of them,
the catalogue-renormalised NLL of the first next page and its rank among every page); `record` is what eval.json
says of it (parameters, training tokens and seconds, context in subwords).
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
from absl import logging

from hetlm_jax.config import Config
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.data.tokenizer import UNK, PageTokenizer
from hetlm_jax.errors import HetlmError
from hetlm_jax.eval import metrics as M
from hetlm_jax.files import location
from hetlm_jax.llm import model as llm_model
from hetlm_jax.llm.finetune import fine_tune
from hetlm_jax.llm.score import catalogue_logprobs, target_nll
from hetlm_jax.llm.text import PageSubwords, page_texts
from hetlm_jax.train.metrics import Progress

RANKED = ("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr")


def family_name(cfg: Config) -> str:
  """The LLM's name in eval.json: llm_scratch, llm_zeroshot, llm_lora or llm_full."""
  finetune = cfg.llm.finetune()
  return "llm_scratch" if cfg.llm.llm == "scratch" else f"llm_{'zeroshot' if finetune == 'none' else finetune}"


def page_names(path: str) -> dict[str, str]:
  """--llm_pages: a JSON object {page id: text}, or one line naming the file and the problem."""
  if not path:
    return {}
  try:
    names = json.loads(location(path, "--llm_pages").read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise HetlmError(f"{path}: not a readable JSON file of page names (--llm_pages): {e}") from None
  if not isinstance(names, dict) or not all(isinstance(v, str) and v.strip() for v in names.values()):
    raise HetlmError(f"{path}: --llm_pages must be a JSON object mapping each page id to a non-empty text")
  return {str(k): v for k, v in names.items()}


class LLMBaseline:
  """--llm in one run: its model, its pages as subwords, and what its training took."""

  def __init__(self, cfg: Config, tokenizer: PageTokenizer, workdir):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.name = family_name(cfg)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.llm.llm.strip("/")).strip("_")[-80:] or "model"
    how = cfg.llm.finetune() + (str(cfg.llm.llm_lora_rank) if cfg.llm.finetune() == "lora" else "")
    self.state_path = location(workdir) / "llm" / f"{slug}-{how}" / "train.pt"  # e.g. llm/gpt2-lora8/train.pt
    self.texts = page_texts(tokenizer, page_names(cfg.llm.llm_pages))
    self.width = cfg.model.context + 1
    self.llm = None
    self.subwords = None
    self.trained: dict = {"finetune": cfg.llm.finetune()}

  def train(self, train_seqs: UserSequences, validation, log) -> None:
    """Loads --llm and trains it as --llm_finetune says (resuming a stopped fine-tune, or reading a finished one)."""
    finetune = self.cfg.llm.finetune()
    saved = self._saved() if finetune != "none" else None
    llm = llm_model.load(
      self.cfg.llm.llm, self.texts, self.cfg.model, self.cfg.train.seed, (saved or {}).get("tokenizer")
    )
    if finetune == "lora":
      llm = llm_model.with_lora(llm, self.cfg.llm.llm_lora_rank)
    self.llm, self.subwords = llm, PageSubwords(self.texts, llm.encode)
    logging.info(
      "LLM %s (%s): %s parameters, %s trained", llm.spec, finetune, f"{llm.params():,}", f"{llm.trainable():,}"
    )
    if finetune == "none":
      return
    if saved is not None and saved.get("done"):
      llm_model.load_trainable(llm, saved["weights"])
      self.trained = saved["record"]
      logging.info("LLM %s: its fine-tune is finished (%s)", llm.spec, self.state_path)
      return
    self.trained = fine_tune(llm, self.cfg, train_seqs, validation, self.subwords, self.state_path, log)

  def _saved(self) -> dict | None:
    if not self.state_path.exists():
      return None
    import torch

    return torch.load(io.BytesIO(self.state_path.read_bytes()), weights_only=False)

  def record(self, context_U: np.ndarray | None = None, ranked: int = 0) -> dict:
    """What eval.json says of the LLM: the model, its parameters (and those trained), its training, its context."""
    out = {
      "model": self.cfg.llm.llm,
      "params": self.llm.params(),
      "trained_params": self.llm.trainable() if self.cfg.llm.finetune() != "none" else 0,
      "page_texts": "--llm_pages" if self.cfg.llm.llm_pages else "the page ids as they are",
      **self.trained,
      "ranked_users": ranked,  # the draw its catalogue_nll, HR and NDCG are over
    }
    if context_U is not None and len(context_U):
      out["context_pages"] = self.cfg.model.context
      out["context_subwords"] = {"mean": float(context_U.mean()), "max": int(context_U.max())}
    return out

  def per_user(self, seqs: UserSequences, evaluated_U: np.ndarray, first_U: np.ndarray, seed: int) -> tuple:
    """({metric: [U]} of the evaluated users, NaN for the others and, for the ranking metrics, for users out of the
    ranked draw; [evaluated] subwords of each one's context; how many users were ranked). `first_U`: where each
    user's first next page is."""
    users = np.flatnonzero(evaluated_U)
    subset = seqs.subset(users)
    nll, tokens, context_U = target_nll(self.llm, subset, self.width, self.subwords, f"{self.name} scoring")
    out = {key: np.full(seqs.num_users, np.nan) for key in ("nll", "catalogue_nll", *RANKED)}
    out["nll"][users] = nll / np.maximum(tokens, 1)
    ranked = np.sort(np.random.default_rng(seed).permutation(users)[: self.cfg.llm.llm_rank_users])
    pages = np.arange(self.tokenizer.num_specials, self.tokenizer.vocab_size)
    candidate_V = np.arange(self.tokenizer.vocab_size) >= self.tokenizer.num_specials
    progress = Progress(len(ranked), f"{self.name} ranking every page", every=max(1, len(ranked) // 10))
    for i, u in enumerate(ranked):
      at = int(first_U[u])
      before = seqs.tokens[max(int(seqs.offsets[u]), at - self.cfg.model.context) : at]
      logp_V = np.full(self.tokenizer.vocab_size, -np.inf)
      logp_V[pages] = catalogue_logprobs(self.llm, self.subwords.context(before, len(before)), self.subwords, pages)
      true = int(seqs.tokens[at])
      got = M.ranking_metrics(logp_V[None], np.array([true]), candidate_V, unknown=UNK)
      for key in RANKED:
        out[key][u] = got[key][0]
      out["catalogue_nll"][u] = M.catalogue_nll(logp_V[None], np.array([true]), candidate_V)[0]
      progress.update(i + 1)
    progress.close()
    return out, context_U, len(ranked)
