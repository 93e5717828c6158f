"""The LLM baseline (hetlm_jax/llm/, issue 33) with no download: a tiny randomly initialised GPT-2 built here from a
config, with a byte-level BPE tokenizer trained here on the pages' names, saved to a folder that --llm names.

Its batched scores equal the sums of subword log-probabilities computed one window at a time; the candidates that
share a context's KV cache score as if each ran alone; zero-shot (train), LoRA (evaluate on a finished run) and a
model from scratch run end to end, the last stopped by SIGTERM and resumed to the same figures; a missing extra, a
model that cannot be loaded and a bad page map are one line each."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_run import REPO, train_args

from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.llm import model as llm_model
from hetlm_jax.llm.score import catalogue_logprobs, target_nll, window_batches
from hetlm_jax.llm.text import HEADER, SEPARATOR, PageSubwords, page_texts
from hetlm_jax.main import cli

PAGES = [f"/p/{i}" for i in range(1, 41)]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
  """A folder with a two-layer GPT-2 (random weights) and its BPE tokenizer trained on the pages' names."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  bpe.train_from_iterator([*PAGES, "<start of session>", "<end of session>", SEPARATOR, HEADER], trainer)
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
  torch.manual_seed(0)
  config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=2, n_head=2, n_inner=32)
  folder = tmp_path_factory.mktemp("tiny_llm") / "gpt2-tiny"
  GPT2LMHeadModel(config).save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # CI has no hub: a name that is not a folder fails at once


def _by_hand(llm, ids: list[int], spans) -> list[float]:
  """log p of each span of subwords of `ids`, from one unpadded forward pass."""
  with torch.no_grad():
    logits = llm.model(input_ids=torch.tensor([ids])).logits[0]
  lp = torch.log_softmax(logits, dim=-1)
  return [sum(float(lp[j - 1, ids[j]]) for j in range(lo, hi)) for lo, hi in spans]


def test_batched_scores_are_the_sums_of_subword_logprobs_by_hand(tiny_llm):
  from hetlm_jax.data.sequences import UserSequences

  tokenizer = PageTokenizer([], PAGES)
  llm = llm_model.load(str(tiny_llm), page_texts(tokenizer), None, seed=0)
  subwords = PageSubwords(page_texts(tokenizer), llm.encode)
  assert all(ids[-len(subwords.separator) :] == subwords.separator for ids in subwords.ids[1:])
  rng = np.random.default_rng(0)
  lengths = rng.integers(4, 30, size=7)  # targets overflow a width of 12: several windows per user
  tokens = [np.r_[2, rng.integers(tokenizer.num_specials, tokenizer.vocab_size, n - 2), 3] for n in lengths]
  offsets = np.r_[0, np.cumsum(lengths)]
  seqs = UserSequences(
    np.arange(len(lengths)).astype(str).astype(object),
    np.concatenate(tokens).astype(np.int32),
    offsets.astype(np.int64),
    (offsets[:-1] + lengths // 2).astype(np.int64),
    np.ones(len(lengths), np.int32),
  )
  nll_U, count_U, context_U = target_nll(llm, seqs, 12, subwords)
  owner_W, start_W, length_W, scored_W, _ = window_batches(seqs, "target", 12)
  want_U, want_count_U = np.zeros(seqs.num_users), np.zeros(seqs.num_users, int)
  for w in range(len(owner_W)):
    ids, spans = list(subwords.header), []
    for i in range(start_W[w], start_W[w] + length_W[w]):
      page = subwords.ids[int(seqs.tokens[i])]
      if i >= scored_W[w]:
        spans.append((len(ids), len(ids) + len(page)))
      ids += page
    want_U[owner_W[w]] -= sum(_by_hand(llm, ids, spans))
    want_count_U[owner_W[w]] += len(spans)
  np.testing.assert_allclose(nll_U, want_U, rtol=1e-4)
  np.testing.assert_array_equal(count_U, seqs.offsets[1:] - seqs.split)  # every target token, once
  np.testing.assert_array_equal(count_U, want_count_U)
  assert (context_U > 0).all()

  # Candidates after a shared KV cache score as each would alone; over every page they renormalise to 1.
  context = subwords.context(seqs.history(0), 5)
  pages = np.arange(tokenizer.num_specials, tokenizer.vocab_size)
  logp = catalogue_logprobs(llm, context, subwords, pages)
  alone = [
    sum(_by_hand(llm, context + subwords.ids[v], [(len(context), len(context) + len(subwords.ids[v]))]))
    for v in pages[:5]
  ]
  np.testing.assert_allclose(logp[:5], alone, rtol=1e-4)
  assert (logp < 0).all() and np.isclose(np.exp(logp - np.logaddexp.reduce(logp)).sum(), 1.0)


def test_zero_shot_llm_beside_the_page_lms_then_lora_added_by_evaluate(tiny_llm, tmp_path, capsys):
  from tiny_run import write_log

  log, run = write_log(tmp_path / "log.parquet"), tmp_path / "run"
  args = train_args(log, run, f"--llm={tiny_llm}", "--llm_finetune=none", "--llm_rank_users=10")
  assert cli(["hetlm", *args]) == 0
  report = json.loads((run / "eval.json").read_text())
  zero = report["llm"]["llm_zeroshot"]
  assert zero["finetune"] == "none" and zero["trained_params"] == 0 and zero["params"] > 0
  assert zero["context_pages"] == 16 and zero["context_subwords"]["mean"] > 16 and zero["ranked_users"] == 10
  models = report["models"]
  assert np.isfinite(models["llm_zeroshot"]["nll"]["mean"])
  assert models["llm_zeroshot"]["nll"]["mean"] > models["hetlm"]["nll"]["mean"]  # random weights, 40 pages
  assert set(zero["vs"]) >= {"hetlm", "hetlm_mixture"}
  assert set(zero["vs"]["hetlm"]) == {"nll", "catalogue_nll", "hr@10", "ndcg@10"}
  assert "catalogue_nll" in models["hetlm"] and "catalogue_nll" in models["markov"]
  text = (run / "report.md").read_text()
  assert "## Claim (i)" in text and "`llm_zeroshot`" in text

  # LoRA added to the finished run by `hetlm evaluate`: trained on the run's training users, stopped by validation.
  assert cli(["hetlm", "evaluate", f"--workdir={run}", f"--llm={tiny_llm}", "--llm_finetune=lora"]) == 0
  report = json.loads((run / "eval.json").read_text())
  lora = report["llm"]["llm_lora"]
  assert 0 < lora["trained_params"] < lora["params"] and lora["tokens_trained"] > 0 and lora["steps"] > 0
  assert "llm_zeroshot" not in report["models"]
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert any(r["kind"] == "llm_validation" for r in records)
  assert report["models"]["llm_lora"]["nll"]["mean"] < models["llm_zeroshot"]["nll"]["mean"]


def test_llm_from_scratch_resumes_after_sigterm_to_the_same_figures(tiny_reference, tmp_path, capsys):
  _, reference = tiny_reference
  runs = {}
  for name in ("whole", "stopped"):
    runs[name] = tmp_path / name
    shutil.copytree(reference, runs[name])
  flags = ["--llm=scratch", "--llm_rank_users=5"]
  assert cli(["hetlm", "evaluate", f"--workdir={runs['whole']}", *flags]) == 0
  before = (runs["stopped"] / "eval.json").read_text()
  assert cli(["hetlm", "evaluate", f"--workdir={runs['stopped']}", *flags, "--inject=sigterm@llm_validation"]) == 0
  assert "stopped training the LLM" in capsys.readouterr().out
  assert (runs["stopped"] / "eval.json").read_text() == before  # nothing written but the saved fine-tune
  saved = torch.load(next((runs["stopped"] / "llm").glob("*/train.pt")), weights_only=False)
  assert not saved["done"] and saved["step"] > 0
  assert cli(["hetlm", "evaluate", f"--workdir={runs['stopped']}", *flags]) == 0
  whole, resumed = (json.loads((runs[n] / "eval.json").read_text()) for n in ("whole", "stopped"))
  for key in ("steps", "tokens_trained", "best_validation_nll"):
    assert whole["llm"]["llm_scratch"][key] == pytest.approx(resumed["llm"]["llm_scratch"][key], rel=1e-5), key
  for metric, summary in whole["models"]["llm_scratch"].items():
    assert summary["mean"] == pytest.approx(resumed["models"]["llm_scratch"][metric]["mean"], rel=1e-5), metric


def _one_line(result):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("hetlm: error: "), result.stderr
  return lines[0]


def test_missing_extra_bad_model_and_bad_page_map_are_one_line(tmp_path):
  from tiny_run import write_log

  log = write_log(tmp_path / "log.parquet")
  blocked = tmp_path / "blocked" / "transformers"
  blocked.mkdir(parents=True)
  (blocked / "__init__.py").write_text("raise ImportError('No module named transformers')\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  hetlm = lambda run, *flags, path=None: subprocess.run(
    [sys.executable, "-m", "hetlm_jax.main", *train_args(log, tmp_path / run, *flags)],
    cwd=REPO,
    env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))},
    capture_output=True,
    text=True,
    timeout=300,
  )
  line = _one_line(hetlm("a", "--llm=scratch", path=str(blocked.parent)))
  assert "--llm needs transformers" in line and "hetlm_jax[llm]" in line
  line = _one_line(hetlm("b", f"--llm={tmp_path / 'no-such-model'}"))
  assert "cannot load it as a causal LM" in line
  (tmp_path / "pages.json").write_text('["not", "a", "map"]')
  line = _one_line(hetlm("c", "--llm=scratch", f"--llm_pages={tmp_path / 'pages.json'}"))
  assert "pages.json" in line and "--llm_pages" in line
  for run in "abc":
    assert not (tmp_path / run / "checkpoints").exists()  # refused before anything is trained
