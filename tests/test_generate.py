"""KV-cache decoding: equal to full recomputation, stops at session end, routed per cluster."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetlm_jax.config import ModelConfig
from hetlm_jax.data.tokenizer import BOS, EOS, PAD
from hetlm_jax.eval.generate import Sampling, make_decoder
from hetlm_jax.model import PageLM, init_params
from hetlm_jax.train.batches import prompts

CFG = ModelConfig(vocab_size=17, context=16, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0)


def _greedy_by_recomputation(cfg, params, prompt, n):
  """Reference: the whole sequence through the model again for every new token."""
  seq = list(prompt)
  for _ in range(n):
    logits = np.array(PageLM(cfg).apply({"params": params}, jnp.array([seq])))[0, -1]
    logits[[PAD, BOS]] = -np.inf
    seq.append(int(np.argmax(logits)))
    if seq[-1] == EOS:
      break
  return seq[len(prompt) :]


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_greedy_decoding_equals_full_recomputation(positions):
  cfg = dataclasses.replace(CFG, positions=positions)
  params = init_params(cfg, jax.random.key(1))
  stacked = {"shared": {}, "cluster": jax.tree.map(lambda x: x[None], params)}
  raw = [[BOS, 5, 6, 7, 8, 9], [BOS, 11], [BOS, 12, 4, 4]]
  p = 8
  prompt = np.zeros((1, len(raw), p), np.int32)
  pad = np.array([[p - len(r) for r in raw]], np.int32)
  for b, r in enumerate(raw):
    prompt[0, b, p - len(r) :] = r
  s = Sampling(max_new=6)
  out = np.asarray(make_decoder(cfg, s)(stacked, prompt, pad, jax.random.split(jax.random.key(0), 1)))[0]
  for b, r in enumerate(raw):
    expected = _greedy_by_recomputation(cfg, params, r, s.max_new)
    got = list(out[b][: len(expected)])
    assert got == expected
    assert all(t == PAD for t in out[b][len(expected) :])


def test_generation_stops_at_session_end():
  cfg = dataclasses.replace(CFG, tie_embeddings=False)
  params = init_params(cfg, jax.random.key(0))
  params = {**params, "head": {**params["head"], "bias": params["head"]["bias"].at[EOS].set(100.0)}}
  stacked = {"shared": {}, "cluster": jax.tree.map(lambda x: x[None], params)}
  prompt = np.array([[[PAD, BOS, 5, 6]]], np.int32)
  out = np.asarray(
    make_decoder(cfg, Sampling(max_new=5))(
      stacked, prompt, np.array([[1]], np.int32), jax.random.split(jax.random.key(0), 1)
    )
  )
  assert out.tolist() == [[[EOS, PAD, PAD, PAD, PAD]]]


def test_sampling_settings_reduce_to_greedy_and_are_seeded():
  params = {"shared": {}, "cluster": jax.tree.map(lambda x: x[None], init_params(CFG, jax.random.key(2)))}
  prompt, pad = np.array([[[BOS, 5, 6, 7]] * 4], np.int32), np.zeros((1, 4), np.int32)
  keys = jax.random.split(jax.random.key(3), 1)
  run = lambda s, k=keys: np.asarray(make_decoder(CFG, s)(params, prompt, pad, k))
  greedy = run(Sampling(max_new=5))
  np.testing.assert_array_equal(run(Sampling(max_new=5, temperature=1.0, top_k=1)), greedy)
  np.testing.assert_array_equal(run(Sampling(max_new=5, temperature=1.0, top_p=1e-6)), greedy)
  hot = Sampling(max_new=5, temperature=5.0)
  np.testing.assert_array_equal(run(hot), run(hot))
  assert not np.array_equal(run(hot), run(hot, jax.random.split(jax.random.key(4), 1)))


def test_prompts_are_left_padded_history_plus_bos_for_a_new_session():
  from hetlm_jax.data.sequences import UserSequences

  # user 0: history <s> 5 6 </s>, target <s> 7 </s> (new session); user 1: single session <s> 8 9 | 10
  tokens = np.array([BOS, 5, 6, EOS, BOS, 7, EOS, BOS, 8, 9, 10], np.int32)
  seqs = UserSequences(
    user_ids=np.array(["a", "b"]),
    tokens=tokens,
    offsets=np.array([0, 7, 11]),
    split=np.array([4, 10]),
    n_sessions=np.array([2, 1], np.int32),
  )
  p, pad = prompts(seqs, np.array([0, 1, -1]), 6)
  assert p.tolist() == [[PAD, BOS, 5, 6, EOS, BOS], [PAD, PAD, PAD, BOS, 8, 9], [PAD] * 6]
  assert pad.tolist()[:2] == [1, 3]
