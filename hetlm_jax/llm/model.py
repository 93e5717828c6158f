"""The subword LM of the LLM baseline, in PyTorch (the `llm` extra: torch, transformers, peft, imported here only).

`load(spec, ...)` gives an `LLM`: a pretrained causal LM by Hugging Face name or folder, or `scratch`, a
GPT-2-shaped model of the page LM's width, depth and heads with a byte-level BPE tokenizer trained on the pages'
text, randomly initialised. `with_lora` wraps one in LoRA adapters (peft); `trainable_state` / `load_trainable` are
what a fine-tune saves and restores (the adapters, or every weight).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence

from hetlm_jax.errors import HetlmError
from hetlm_jax.llm.text import HEADER, SEPARATOR

EXTRA = "pip install 'hetlm_jax[llm]'"


def require(*modules: str) -> None:
  """Imports `modules` (torch, transformers, peft), or one line naming the missing one and the extra."""
  for name in modules:
    try:
      __import__(name)
    except ImportError as e:
      raise HetlmError(f"--llm needs {name} ({e}): {EXTRA}") from None


def check(spec: str, finetune: str) -> None:
  """Before anything is trained: the libraries --llm needs are there, and a pretrained model's config can be read
  (by name, from the local cache or the hub, or from a folder); else one line."""
  require("torch", "transformers", *(["peft"] if finetune == "lora" else []))
  if spec == "scratch":
    return
  from transformers import AutoConfig

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      AutoConfig.from_pretrained(spec)
  except (OSError, ValueError, KeyError) as e:
    raise HetlmError(_cannot_load(spec, e)) from None


def _cannot_load(spec: str, e: Exception) -> str:
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
  return f"--llm={spec}: cannot load it as a causal LM{offline}: {first}"


@dataclasses.dataclass
class LLM:
  """A causal LM and its tokenizer's `encode`, on `device`; `max_positions`: the longest input it takes."""

  spec: str
  model: object  # a transformers causal LM (or a peft model around one)
  tokenizer: object
  device: str
  max_positions: int
  tokenizer_json: str | None = None  # scratch's BPE, saved with its fine-tune so a resumed run has the same subwords

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def params(self) -> int:
    return int(sum(p.numel() for p in self.model.parameters()))

  def trainable(self) -> int:
    return int(sum(p.numel() for p in self.model.parameters() if p.requires_grad))


def device() -> str:
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def load(spec: str, texts: Sequence[str], model_cfg, seed: int, tokenizer_json: str | None = None) -> LLM:
  """The LM of --llm=`spec`: `scratch` (built from `model_cfg`, the page LM's ModelConfig, with a BPE tokenizer
  trained on `texts`, the pages' texts, or the saved `tokenizer_json`), else a pretrained model by name or folder."""
  require("torch", "transformers")
  import torch

  torch.manual_seed(seed)
  if spec == "scratch":
    return _scratch(texts, model_cfg, tokenizer_json)
  from transformers import AutoModelForCausalLM, AutoTokenizer

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      tokenizer = AutoTokenizer.from_pretrained(spec)
      model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
  except (OSError, ValueError, KeyError, ImportError) as e:
    raise HetlmError(_cannot_load(spec, e)) from None
  limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
  on = device()
  return LLM(spec, model.to(on), tokenizer, on, int(limit or 1 << 30))


def _scratch(texts: Sequence[str], model_cfg, tokenizer_json: str | None) -> LLM:
  """A GPT-2-shaped LM of the page LM's d_model, layers, heads and feed-forward width, its BPE trained on the
  pages' texts (each alone, with the separator and the header: the only text it ever sees)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

  if tokenizer_json is None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    pieces = [t for t in texts if t] + [SEPARATOR, HEADER]
    # 256 bytes, the end token, and merges up to about two per distinct page (none cross a page: each is alone)
    size = 257 + min(4 * len(pieces), 8000)
    trainer = trainers.BpeTrainer(
      vocab_size=size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(pieces, trainer)
    tokenizer_json = bpe.to_str()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token="<|endoftext|>")
  longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in [*texts, SEPARATOR] if t)
  sep = len(tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
  header = len(tokenizer(HEADER, add_special_tokens=False)["input_ids"])
  positions = header + (model_cfg.context + 1) * (longest + sep)  # the longest window the page LM sees, as text
  end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  config = GPT2Config(
    vocab_size=len(tokenizer),
    n_positions=positions,
    n_embd=model_cfg.d_model,
    n_layer=model_cfg.n_layers,
    n_head=model_cfg.n_heads,
    n_inner=model_cfg.d_ff,
    resid_pdrop=model_cfg.dropout,
    embd_pdrop=model_cfg.dropout,
    attn_pdrop=model_cfg.dropout,
    bos_token_id=end,
    eos_token_id=end,
    tie_word_embeddings=model_cfg.tie_embeddings,
  )
  on = device()
  return LLM("scratch", GPT2LMHeadModel(config).to(on), tokenizer, on, positions, tokenizer_json)


def with_lora(llm: LLM, rank: int) -> LLM:
  """`llm` with LoRA adapters of `rank` on every linear layer (peft), the base weights frozen."""
  require("peft")
  from peft import LoraConfig, get_peft_model

  config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself, with a warning
    model = get_peft_model(llm.model, config)
  return dataclasses.replace(llm, model=model)


def trainable_state(llm: LLM) -> dict:
  """The weights a fine-tune changes (LoRA's adapters, or every weight), on the CPU."""
  return {k: v.detach().cpu().clone() for k, v in llm.model.named_parameters() if v.requires_grad}


def load_trainable(llm: LLM, state: dict) -> None:
  """Puts `trainable_state`'s weights back."""
  import torch

  named = dict(llm.model.named_parameters())
  with torch.no_grad():
    for k, v in state.items():
      named[k].copy_(v.to(named[k].device))
