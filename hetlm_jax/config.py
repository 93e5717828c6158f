"""One typed config for a run: model, training schedule, data and clustering, saved as config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hetlm_jax.errors import HetlmError
from hetlm_jax.files import replace_text


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 0  # filled in from the tokenizer
  context: int = 64  # tokens the model sees; longer histories are cut from the left
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 256
  dropout: float = 0.1
  positions: str = "rope"  # "rope" | "learned"
  tie_embeddings: bool = True
  dtype: str = "auto"  # compute dtype (params stay float32); auto: bfloat16 on GPU and TPU, float32 on CPU
  output_bias: bool = False  # a bias on the output logits (a cluster's own, with --cluster_params other than all)
  lora_rank: int = 0  # > 0: LoRA adapters of this rank on every projection (--cluster_params=adapters:R)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self) -> str:
    """`dtype`, with auto resolved for the backend JAX runs on."""
    if self.dtype != "auto":
      return self.dtype
    import jax  # here, so reading a config does not start JAX
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 64  # windows per cluster per step, across all devices
  epochs: int = 8  # passes over every user per round, at most (the cap of early stopping)
  patience: int = 2  # stop a round after this many validations without a better one (0: run every pass)
  warm_epochs: int = 2  # passes at most of a round that goes on from a trained model (warm start, anneal)
  val_every: float = 0.25  # passes between validations in such a round (a round from scratch: every pass)
  val_frac: float = 0.1  # training users whose held-out targets decide early stopping (and --k=auto)
  learning_rate: float = 3e-3
  warmup_frac: float = 0.05
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 50  # steps between metrics records (progress is also shown at least every 10 s)
  prefetch: int = 2  # batches built and put on the devices ahead of the step, in a background thread (0: none)
  balance: bool = True  # smaller clusters cycle their own users instead of padding (see train/batches.py)
  max_repeat: int = 0  # with balance: a cluster's users appear at most this many times a pass (0: no cap)
  tensorboard: bool = False  # also write TensorBoard event files, WORKDIR/tensorboard/MODEL (needs tensorboardX)
  stack: str = "auto"  # how the K models share a step: vmap | unroll | auto (unroll on CPU, vmap elsewhere)
  checkpoint_every: int = 500  # steps; a checkpoint is also saved at the end of every round
  keep_checkpoints: int = 3
  eval_batch_size: int = 512


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ""  # empty: the msnbc sample shipped inside the package
  format: str = "auto"  # auto | events | msnbc | user_items
  session_gap_minutes: float = 30.0
  holdout: str = "auto"  # single-session users: auto | half | last
  min_count: int = 1
  max_vocab: int = 0  # 0: no cap
  max_users: int = 0  # 0: all users
  test_users: int = 0  # > 0: split by user (whole sequences of new users are the test), not in time
  train_users: int = 0  # with test_users: how many users train (0: all the others)
  split_seed: int = 0  # the split by user takes numpy.random.default_rng(split_seed).permutation(U)
  test_offset: int = -1  # where the test users start in that permutation (-1: right after the training users)


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  k: int = 4  # 0: choose among k_candidates by held-out NLL
  k_candidates: str = "2,4,8"
  rounds: int = 3  # at most; training stops earlier once fewer than `tolerance` of users move
  tolerance: float = 0.005
  init: str = "embedding"  # random | features | embedding (measured best: docs/RESULTS.md)
  warm_start: bool = True  # with init=embedding: all K models start from that single LM
  soft: bool = True  # soft EM: each model trains on every user, weighted by its posterior responsibility
  init_rounds: int = 3  # rounds from scratch of every single LM (the init LM, single, single_matched), at most
  warm_lr_scale: float = 0.05  # warm-started rounds start at this fraction of --learning_rate, then decay
  prox: float = 0.0  # warm-started models: an L2 pull of strength prox toward the LM they start from
  route_frac: float = 0.0  # the last share of every training history: kept out of training, routes users
  tune_baselines: bool = False  # HeTLM's prox and single_matched's learning rate and dropout from small grids
  interpolate: bool = True  # warm-started models end as alpha_k theta_k + (1 - alpha_k) theta_init (validation)
  mix_init: bool = False  # warm-started models predict lam_k p_k + (1 - lam_k) p_init (validation)
  min_cluster_frac: float = 0.1  # of a balanced share U/K; smaller clusters are re-seeded
  baselines: bool = True  # also train the single LMs (per-cluster size and parameter-matched)
  cluster_axis: int = 1  # devices along the 'cluster' mesh axis; the rest form the 'data' axis
  cluster_params: str = "all"  # which parameters each cluster owns: all | head | top:N | adapters:R

  def lora_rank(self) -> int:
    return int(self.cluster_params.split(":")[1]) if self.cluster_params.startswith("adapters:") else 0

  def candidates(self) -> list[int]:
    return [int(x) for x in self.k_candidates.split(",") if x.strip()]


FLAG_NAMES = {"path": "data"}  # config field → command-line flag, where they differ


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  cluster: ClusterConfig = ClusterConfig()

  def replace(self, **sections) -> Config:
    return dataclasses.replace(self, **sections)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> Config:
    kinds = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "cluster": ClusterConfig}
    unknown = set(d) - set(kinds)
    if unknown:
      raise HetlmError(f"config: unknown sections {sorted(unknown)}")
    return cls(**{name: kinds[name](**d.get(name, {})) for name in kinds})

  def save(self, path: Path) -> None:
    replace_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

  @classmethod
  def load(cls, path: Path) -> Config:
    try:
      return cls.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
      raise HetlmError(f"{path}: not a readable hetlm config ({e})") from None


def validate(cfg: Config) -> None:
  """Refuses out-of-range values with one line naming the flag, before anything is written."""
  m, t, d, c = cfg.model, cfg.train, cfg.data, cfg.cluster
  checks = [
    (m.context >= 2, "--context must be at least 2"),
    (m.d_model >= 1 and m.n_layers >= 1 and m.n_heads >= 1 and m.d_ff >= 1,
     "--d_model, --n_layers, --n_heads and --d_ff must be positive"),
    (m.d_model % max(m.n_heads, 1) == 0, f"--d_model={m.d_model} must be divisible by --n_heads={m.n_heads}"),
    (m.positions in ("rope", "learned"), f"--positions={m.positions!r}: expected rope or learned"),
    (m.positions != "rope" or m.head_dim % 2 == 0, "--positions=rope needs an even d_model / n_heads"),
    (0.0 <= m.dropout < 1.0, f"--dropout={m.dropout} must be in [0, 1)"),
    (m.dtype in ("auto", "float32", "bfloat16"), f"--dtype={m.dtype!r}: expected auto, float32 or bfloat16"),
    (t.batch_size >= 1, f"--batch_size={t.batch_size} must be at least 1"),
    (t.epochs >= 1, f"--epochs={t.epochs} must be at least 1"),
    (t.patience >= 0, f"--patience={t.patience} must be non-negative"),
    (t.warm_epochs >= 1, f"--warm_epochs={t.warm_epochs} must be at least 1"),
    (0.0 < t.val_every <= 1.0, f"--val_every={t.val_every} must be in (0, 1]"),
    (t.max_repeat >= 0, f"--max_repeat={t.max_repeat} must be non-negative"),
    (0.0 <= t.val_frac < 1.0, f"--val_frac={t.val_frac} must be in [0, 1)"),
    (t.val_frac > 0 or (t.patience == 0 and c.k != 0),
     "--val_frac=0 leaves no validation users: it needs --patience=0 and a fixed --k"),
    (t.learning_rate > 0, f"--learning_rate={t.learning_rate} must be positive"),
    (0.0 <= t.warmup_frac < 1.0, f"--warmup_frac={t.warmup_frac} must be in [0, 1)"),
    (t.weight_decay >= 0, f"--weight_decay={t.weight_decay} must be non-negative"),
    (t.grad_clip > 0, f"--grad_clip={t.grad_clip} must be positive"),
    (t.log_every >= 1, f"--log_every={t.log_every} must be at least 1"),
    (t.prefetch >= 0, f"--prefetch={t.prefetch} must be at least 0"),
    (t.stack in ("auto", "vmap", "unroll"), f"--stack={t.stack!r}: expected auto, vmap or unroll"),
    (t.checkpoint_every >= 1, f"--checkpoint_every={t.checkpoint_every} must be at least 1"),
    (t.keep_checkpoints >= 1, f"--keep_checkpoints={t.keep_checkpoints} must be at least 1"),
    (t.eval_batch_size >= 1, f"--eval_batch_size={t.eval_batch_size} must be at least 1"),
    (d.format in ("auto", "events", "msnbc", "user_items"),
     f"--format={d.format!r}: expected auto, events, msnbc or user_items"),
    (d.session_gap_minutes > 0, f"--session_gap_minutes={d.session_gap_minutes} must be positive"),
    (d.holdout in ("auto", "half", "last"), f"--holdout={d.holdout!r}: expected auto, half or last"),
    (d.min_count >= 1, f"--min_count={d.min_count} must be at least 1"),
    (d.max_vocab == 0 or d.max_vocab >= 5, f"--max_vocab={d.max_vocab} must be 0 (no cap) or at least 5"),
    (d.max_users >= 0, f"--max_users={d.max_users} must be non-negative"),
    (d.test_users >= 0 and d.train_users >= 0, "--test_users and --train_users must be non-negative"),
    (d.test_users > 0 or d.train_users == 0, "--train_users needs --test_users (the split by user)"),
    (d.test_offset >= -1, f"--test_offset={d.test_offset} must be -1 (after the training users) or a position"),
    (d.test_users > 0 or d.test_offset == -1, "--test_offset needs --test_users (the split by user)"),
    (d.test_users == 0 or c.k != 0, "--k=auto needs the split in time (no --test_users): it chooses K "
                                    "on held-out targets of the training users"),
    (c.k >= 1 or c.k == 0, f"--k={c.k} must be at least 1 (or auto)"),
    (_ints(c.k_candidates) and all(x >= 1 for x in c.candidates()),
     f"--k_candidates={c.k_candidates!r}: expected positive integers separated by commas"),
    (c.rounds >= 1, f"--rounds={c.rounds} must be at least 1"),
    (0.0 <= c.tolerance < 1.0, f"--tolerance={c.tolerance} must be in [0, 1)"),
    (c.init in ("random", "features", "embedding"), f"--init={c.init!r}: expected random, features or embedding"),
    (c.init_rounds >= 1, f"--init_rounds={c.init_rounds} must be at least 1"),
    (0.0 < c.warm_lr_scale <= 1.0, f"--warm_lr_scale={c.warm_lr_scale} must be in (0, 1]"),
    (c.prox >= 0.0, f"--prox={c.prox} must be non-negative"),
    (not c.tune_baselines or c.k != 0, "--tune_baselines needs a fixed --k (--k=auto already trains one HeTLM per K)"),
    (0.0 <= c.route_frac < 1.0, f"--route_frac={c.route_frac} must be in [0, 1)"),
    (0.0 <= c.min_cluster_frac < 1.0, f"--min_cluster_frac={c.min_cluster_frac} must be in [0, 1)"),
    (c.cluster_axis >= 1, f"--cluster_axis={c.cluster_axis} must be at least 1"),
    (_cluster_params_ok(c.cluster_params, m.n_layers),
     f"--cluster_params={c.cluster_params!r}: expected all, head, top:N (1 <= N <= --n_layers={m.n_layers}) "
     "or adapters:R (R >= 1)"),
  ]
  for ok, message in checks:
    if not ok:
      raise HetlmError(message)


def _cluster_params_ok(spec: str, n_layers: int) -> bool:
  kind, _, n = spec.partition(":")
  if kind in ("all", "head"):
    return not n
  return kind in ("top", "adapters") and n.isdigit() and int(n) >= 1 and (kind == "adapters" or int(n) <= n_layers)


def _ints(text: str) -> bool:
  parts = [x.strip() for x in text.split(",")]
  return bool(parts) and all(x.isdigit() for x in parts)
