"""Run by tests/test_multiprocess.py, as one process or through launch/local.sh: scores and embeds a fixed set of
users with a fixed tiny model, clusters them by the k-means initialisation fitted on a sample of them, ranks their
next pages under a fixed host model with each process ranking its own rows, and saves, per process, what it laid
out and the results it ends with. Per-user results are gathered in pieces of a few users (hosts.Groups.PIECE_BYTES).

  python tests/score_in_processes.py OUT_DIR [--coordinator_address=... --num_processes=N --process_id=I]
"""

import sys
from pathlib import Path

import numpy as np

from hetlm_jax import hosts
from hetlm_jax.cluster.assign import embedding_kmeans
from hetlm_jax.config import ClusterConfig, Config, ModelConfig, TrainConfig
from hetlm_jax.data.sequences import UserSequences
from hetlm_jax.eval.evaluate import EvalOptions, rank_next_pages
from hetlm_jax.train.loop import Trainer

CFG = Config(
  model=ModelConfig(vocab_size=19, context=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0),
  train=TrainConfig(batch_size=8, eval_batch_size=8),
  cluster=ClusterConfig(k=2),
)


def users() -> UserSequences:
  """150 users: the first 60 with long histories (several windows each), the rest short, so the two halves of the
  users need different numbers of scoring batches."""
  rng = np.random.default_rng(0)
  length_U = np.concatenate([rng.integers(20, 40, 60), rng.integers(3, 9, 90)])
  offsets = np.concatenate([[0], np.cumsum(length_U)]).astype(np.int64)
  return UserSequences(
    user_ids=np.array([f"u{i}" for i in range(len(length_U))], object),
    tokens=rng.integers(4, 19, int(offsets[-1])).astype(np.int32),
    offsets=offsets,
    split=offsets[1:] - 2,
    n_sessions=np.ones(len(length_U), np.int32),
  )


def main(out: Path, flags: list[str]) -> None:
  given = dict(flag.lstrip("-").split("=", 1) for flag in flags)
  hosts.initialize(
    given.get("coordinator_address", ""), int(given.get("num_processes", 0)), int(given.get("process_id", -1))
  )
  hosts.Groups.PIECE_BYTES = 256  # many gathers of a few users each, every piece's users put in place
  trainer, seqs = Trainer(CFG, 2), users()
  single = Trainer(CFG, 1)
  params = trainer.init_state().params
  group, groups, _ = trainer.scoring_share()
  laid_out = trainer._scoring_batches(seqs, "history")[0]
  history_KxU, tokens_U = trainer.score(params, seqs, "history")
  target_KxU, target_tokens_U = trainer.score(params, seqs, "target", pages_only=True)
  rows = trainer.scoring_share()[2]
  logp_UxV = np.log(np.random.default_rng(1).dirichlet(np.ones(19), seqs.num_users))  # a host model: one row a user
  pages = type("Pages", (), {"vocab_size": 19, "num_specials": 4})
  opts = EvalOptions(negatives=5)
  ranking = rank_next_pages(
    lambda batch: logp_UxV[batch[rows]],
    seqs,
    pages,
    opts,
    trainer.eval_batch,
    "ranking",
    share=(trainer.groups(), rows),
  )
  np.savez(
    out / f"process{hosts.share()[0]}.npz",
    **{f"ranking_{key}": values for key, values in ranking.items()},
    share=np.array([group, groups]),
    laid_out=laid_out,
    history=history_KxU,
    tokens=tokens_U,
    target=target_KxU,
    target_tokens=target_tokens_U,
    embedding=trainer.embed(params, seqs),
    kmeans=embedding_kmeans(single, single.init_state().params, seqs, 3, 0, most_users=40),
  )


if __name__ == "__main__":
  main(Path(sys.argv[1]), sys.argv[2:])
