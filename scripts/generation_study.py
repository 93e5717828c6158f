"""Greedy decoding against sampling for generated next sessions, on a trained workdir (docs/RESULTS.md).

  python scripts/generation_study.py --workdir=runs/default --out=docs/generation_study.json

For each decoding setting, HeTLM generates the next session of the same users (the first 500 of the
evaluated users in a fixed random order, never the validation users): edit similarity, Jaccard and ROUGE-L F1
against the actual session, the mean length, and the repetition rate, the share of generated sessions that
repeat one page more often than 99% of real sessions (the sessions of the training histories) do.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from hetlm_jax.cluster.validation import validation_slice
from hetlm_jax.data.sequences import session_length_from_data
from hetlm_jax.data.tokenizer import BOS, EOS
from hetlm_jax.eval import metrics as M
from hetlm_jax.eval.generate import Sampling, generate
from hetlm_jax.workdir import load_run, run_data

SETTINGS = [
  ("greedy", Sampling()),
  ("T=1.0", Sampling(temperature=1.0)),
  ("T=0.8, top-p 0.9", Sampling(temperature=0.8, top_p=0.9)),
  ("T=0.7", Sampling(temperature=0.7)),
  ("T=1.0, top-p 0.9", Sampling(temperature=1.0, top_p=0.9)),
]

flags.DEFINE_string("workdir", "runs/default", "A trained hetlm workdir.")
flags.DEFINE_integer("users", 500, "Users whose next session is generated.")
flags.DEFINE_integer("seeds", 3, "Sampling seeds per setting (greedy needs one).")
flags.DEFINE_string("out", "", "Write the table as JSON here.")
FLAGS = flags.FLAGS


def history_sessions(seqs, num_specials: int) -> list[np.ndarray]:
  """The page tokens of every session in the training histories (cut at session markers)."""
  out = []
  for u in range(seqs.num_users):
    h = seqs.history(u)
    for part in np.split(h, np.flatnonzero((h == BOS) | (h == EOS))):
      pages = part[part >= num_specials]
      if len(pages):
        out.append(pages)
  return out


def main(_) -> None:
  cfg, prepared = run_data(Path(FLAGS.workdir), None)
  seqs, _, evaluated_U = validation_slice(cfg, prepared)
  run = load_run(FLAGS.workdir)
  specials = prepared.tokenizer.num_specials
  candidates = np.flatnonzero(evaluated_U & (seqs.target_lengths > 0))
  users = np.sort(np.random.default_rng(0).permutation(candidates)[: FLAGS.users])
  actual = [seqs.target(int(u))[seqs.target(int(u)) >= specials] for u in users]
  real = history_sessions(seqs, specials)
  length = session_length_from_data(seqs, specials)  # None when the histories hold session ends
  rows = []
  for name, sampling in SETTINGS:
    if length is not None:
      sampling = dataclasses.replace(sampling, max_new=min(sampling.max_new, length))
    per_seed = []
    for seed in range(1 if sampling.temperature == 0 else FLAGS.seeds):
      generated = [
        g[g >= specials]
        for g in generate(run.config.model, run.params, seqs, run.assignment, users, sampling, seed=seed)
      ]
      per_seed.append(
        {
          "edit_similarity": M.edit_similarity(generated, actual).mean(),
          "jaccard": M.jaccard(generated, actual).mean(),
          "rouge_l_f1": M.rouge_l_f1(generated, actual).mean(),
          "length": float(np.mean([len(g) for g in generated])),
          "repetition_rate": M.repetition_rate(generated, real),
        }
      )
    row = {"setting": name, "temperature": sampling.temperature, "top_p": sampling.top_p, "seeds": len(per_seed)}
    row.update({key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]})
    rows.append(row)
    print(json.dumps(row), file=sys.stderr)
  result = {
    "workdir": FLAGS.workdir,
    "users": len(users),
    "length_from_data": length,
    "actual_length": float(np.mean([len(a) for a in actual])),
    "real_repetition_rate": M.repetition_rate(actual, real),
    "settings": rows,
  }
  print(json.dumps(result, indent=2))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
