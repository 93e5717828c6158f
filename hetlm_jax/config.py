"""One typed config for a run: model, training schedule, data and clustering, saved as config.json.

This file is the one description of every setting: each field's default, its help (the --flag's, generated
from it by main.py), whether a resumed run may change it, and which model settings the run derives instead
(from the data and --cluster_params: never flags, never in config.json).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hetlm_jax.errors import HetlmError
from hetlm_jax.files import location, replace_text


def _option(default, help: str, *, flag: str | None = None, resumable: bool = False, auto: int | None = None):
  """A setting the user chooses: its default and the help of its --flag (named as the field, or `flag`);
  `resumable`: a resumed run may change it; `auto`: the flag also takes "auto", which stands for this value."""
  return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "resumable": resumable, "auto": auto})


def _derived(default, how: str):
  """A model setting the run derives (`how`) when it builds a model: not a flag, and not saved in config.json."""
  return dataclasses.field(default=default, metadata={"derived": how})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model of one family. Built by a run, its derived fields are filled in (Config.built)."""

  vocab_size: int = _derived(0, "the tokenizer's vocabulary")
  context: int = _option(
    64,
    "Tokens the model attends over at once; a longer history is trained on and scored in windows of this many "
    "tokens that cover all of it, and next pages and generation condition on its last ones.",
  )
  d_model: int = _option(64, "Width of each cluster model's residual stream.")
  n_layers: int = _option(2, "Transformer blocks per model.")
  n_heads: int = _option(4, "Attention heads per block (d_model must divide into them, with an even head width).")
  d_ff: int = _option(256, "Width of each block's feed-forward layer.")
  dropout: float = _option(0.1, "Dropout rate on embeddings, attention and feed-forward outputs while training.")
  positions: str = _option("rope", "Position encoding: rope (rotary, restarting in every packed segment) or learned.")
  tie_embeddings: bool = _option(True, "Share the page embedding with the output layer.")
  dtype: str = _option(
    "auto",
    "Compute dtype: auto (bfloat16 on GPU and TPU, float32 on CPU), float32 or bfloat16; parameters stay float32.",
  )
  output_bias: bool = _derived(False, "--cluster_params other than all: a bias on the output logits, a cluster's own")
  lora_rank: int = _derived(0, "--cluster_params=adapters:R: LoRA adapters of rank R on every projection")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
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
  """The training schedule, early stopping, input pipeline and checkpoints."""

  batch_size: int = _option(64, "Windows per cluster per step, over all devices.")
  epochs: int = _option(
    8, "Passes over every user per round, at most: the learning-rate schedule's cycle, cut short by early stopping."
  )
  patience: int = _option(
    2,
    "Stop a round after this many validations without a better per-user mean validation NLL; a round from scratch "
    "counts them once half of --epochs is trained (0: train every pass).",
  )
  warm_epochs: int = _option(
    2,
    "Passes at most of a round that goes on from a trained model: a warm-started round, and the anneal that ends "
    "every single LM.",
  )
  val_every: float = _option(
    0.25, "Passes between validations in such a round (a round from scratch validates every pass)."
  )
  val_frac: float = _option(
    0.1,
    "Share of the training users whose held-out targets decide early stopping and --k=auto; they are left out of "
    "the reported evaluation.",
  )
  learning_rate: float = _option(0.003, "Peak AdamW learning rate of each round's warmup-then-cosine schedule.")
  warmup_frac: float = _option(0.05, "Share of each round's cap of steps spent warming the learning rate up.")
  weight_decay: float = _option(0.01, "AdamW weight decay (not on norms, biases or learned positions).")
  grad_clip: float = _option(1.0, "Clip each model's gradient to this global norm.")
  seed: int = _option(0, "Seed of initialisation, shuffling, dropout and k-means: the same seed gives the same run.")
  log_every: int = _option(
    50, "Steps between training records in metrics.jsonl (the progress line shows at least every 10 s).", resumable=True
  )
  prefetch: int = _option(
    2,
    "Batches built on the host and put on the devices ahead of the step, in a background thread (0: built in the "
    "step loop).",
    resumable=True,
  )
  balance: bool = _option(
    True,
    "Smaller clusters cycle their own users, each token weighted by 1/appearances, instead of training on padding "
    "while the largest cluster finishes its epoch.",
  )
  max_repeat: int = _option(
    0, "With --balance: a smaller cluster's users appear at most this many times per pass (0: no cap)."
  )
  data_shards: int = _option(
    1,
    "Cut the users into this many shards by a hash of their id, each filling its own --batch_size / N rows of "
    "every batch from its own users (1: every row from all users). A multiple of the hosts holding different rows "
    "lets each build its rows from its own users; the batches do not depend on the number of processes.",
  )
  tensorboard: bool = _option(
    False,
    "Also write TensorBoard event files beside metrics.jsonl, one run per model in WORKDIR/tensorboard (needs "
    "tensorboardX: pip install tensorboardX, or pip install -e '.[tensorboard]' in the repository).",
    resumable=True,
  )
  stack: str = _option(
    "auto",
    "How the K models share one jitted step: vmap (batched matmuls), unroll (K graphs in one program, faster steps "
    "on CPU, but longer to compile as K grows) or auto (unroll a single model on CPU, vmap for K > 1 and "
    "elsewhere).",
    resumable=True,
  )
  checkpoint_every: int = _option(
    500, "Steps between periodic checkpoints (one is also saved at the end of every round).", resumable=True
  )
  keep_checkpoints: int = _option(3, "Checkpoints kept per model; older ones are deleted.", resumable=True)
  eval_batch_size: int = _option(
    512, "Rows per batch when scoring users (evaluation, validation, reassignment).", resumable=True
  )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the log is, how it is read, and how users and sessions are split."""

  path: str = _option(
    "",
    "Browsing log: Parquet/CSV events as a file, a folder of parts, a glob, a comma-separated list or a URI "
    "(gs://, s3://, file://); or one UCI msnbc or 'user item' file. Default: the packaged msnbc sample.",
    flag="data",
  )
  format: str = _option("auto", "Input format: auto, events, msnbc or user_items.")
  session_gap_minutes: float = _option(30.0, "Inactivity that starts a new session when the log has no session_id.")
  holdout: str = _option("auto", "How single-session users are split: half (prefix/suffix), last (last page), auto.")
  min_count: int = _option(1, "Pages seen fewer times than this in training histories share one unknown-page token.")
  max_vocab: int = _option(0, "Keep only the most frequent pages, up to this many (0: no cap).")
  max_users: int = _option(0, "Keep only the first N users of the log (0: all).")
  parts_by_user: bool = _option(
    False,
    "The part files of --data hold whole users (no user in two parts, as Spark's repartition(N, 'user_id') or a "
    "bucketed export writes them): with several processes, process p reads only parts p, p+P, ... instead of "
    "every part; a user found in two parts stops the run in one line.",
  )
  own_users: bool = _option(
    False,
    "With several processes, each keeps only the users it owns (by a hash of their id) after preparation, instead "
    "of receiving every user's tokens: each trains its rows of every batch from its own users (--data_shards is the "
    "number of processes), scores and moves them, and only sums and per-user scalars pass between the processes. "
    "Needs --split=hash and --init=random or embedding; the run then resumes on the same number of processes only.",
  )
  test_users: int = _option(
    0,
    "Split by user instead of in time: N users, never trained on, whose whole sequences are the test (0: each "
    "user's last session is held out).",
  )
  train_users: int = _option(0, "With --test_users: the number of users to train on (0: all the others).")
  split: str = _option(
    "permutation",
    "How users are drawn at random for the split by user and the validation users: permutation (of all users in "
    "id order, with numpy.random.default_rng; the protocol of the published figures) or hash (in the order of a "
    "seeded hash of the user ids, so which of two users comes first depends on their ids alone, and a validation "
    "user of the split in time is drawn from its id alone: the same whatever the other users, the log's order or "
    "the number of processes; so are --init=random's clusters and the evaluation's draws: the generated users, the "
    "negatives and the Markov mixture's start).",
  )
  split_seed: int = _option(0, "The seed of the split by user's random order of users (--split).")
  test_offset: int = _option(
    -1,
    "With --test_users: the test users start at this position of that permutation, and the training users are the "
    "first --train_users of the others, so runs of different sizes share one test set (-1: right after the training"
    " users).",
  )


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """HeTLM's clusters: K, the rounds, the initial assignment, warm starts and the baselines."""

  k: int = _option(4, "Number of cluster models K, or auto (the best of --k_candidates by held-out NLL).", auto=0)
  k_candidates: str = _option("2,4,8", "The K values --k=auto tries, separated by commas.")
  rounds: int = _option(3, "Reassignment rounds at most (each trains until the validation NLL stops improving).")
  tolerance: float = _option(0.005, "Stop once fewer than this fraction of users change cluster in a round.")
  init: str = _option(
    "embedding",
    "Initial assignment: random (balanced; with --split=hash, by a seeded hash of each user's id), features (k-means "
    "on TF-IDF page/transition counts), embedding (k-means on a single LM's mean hidden states).",
  )
  warm_start: bool = _option(True, "With --init=embedding, start every cluster model from that single LM.")
  kmeans_users: int = _option(
    1_000_000,
    "With --init=embedding, k-means is fitted on at most this many users (drawn by a seeded hash of their ids), "
    "and every user goes to the nearest centre.",
  )
  soft: bool = _option(
    True,
    "Soft EM: after the first round every cluster model trains on every user, each weighted by the posterior of "
    "that cluster given the user's history (assignments.parquet keeps the most likely).",
  )
  init_rounds: int = _option(
    3,
    "Rounds from scratch of every single LM, at most: the one --init=embedding clusters (and --warm_start copies), "
    "single and single_matched; each then anneals (see --warm_epochs).",
  )
  warm_lr_scale: float = _option(
    0.05,
    "Warm-started rounds (HeTLM's clusters, single_ft) start at this fraction of --learning_rate, with no warmup, "
    "and decay to 1/20 of it.",
  )
  prox: float = _option(
    0.0,
    "Warm-started models: the gradient of prox/2 ||theta - theta_init||^2, a pull toward the LM they start from (0:"
    " none).",
  )
  route_frac: float = _option(
    0.0,
    "Keep this last share of every training user's history out of training, and route users (the E-step) by it "
    "alone, so reassignment never rewards memorising (0: route by the whole history).",
  )
  tune_baselines: bool = _option(
    False,
    "Choose HeTLM's --prox (0, 1, 3) and single_matched's learning rate (1/3 and 1 x --learning_rate) and dropout "
    "(+0, +0.1) on the validation users: both sides tuned, not one; trains 3 HeTLMs and 4 single_matched LMs "
    "instead of one each.",
  )
  interpolate: bool = _option(
    True,
    "Warm-started models end as alpha_k theta_k + (1 - alpha_k) theta_init, their parameters interpolated toward "
    "the LM they started from, alpha per cluster from 0, 0.25, ..., 1 by the validation users (alpha 0 for all is "
    "that LM, so validation cannot see them fall below it).",
  )
  mix_init: bool = _option(
    False,
    "Warm-started models predict lam_k p_k + (1 - lam_k) p_init, a mixture in prediction space with the LM they "
    "started from, lam per cluster from 0, 0.25, ..., 1 by the validation users; that LM's parameters count in "
    "HeTLM's total, and scoring and decoding run it beside the K models.",
  )
  min_cluster_frac: float = _option(
    0.1, "A cluster smaller than this fraction of U/K is re-seeded by splitting the largest."
  )
  baselines: bool = _option(True, "Also train the single-LM baselines (per-cluster size and parameter-matched).")
  cluster_axis: int = _option(1, "Devices on the 'cluster' mesh axis (the rest shard the batch).")
  cluster_params: str = _option(
    "all",
    "Which parameters each cluster owns; the rest is one shared trunk trained on every user: all (K whole models), "
    "head (final norm and output bias), top:N (also the last N blocks), adapters:R (also LoRA of rank R on every "
    "projection).",
  )

  def lora_rank(self) -> int:
    """R of --cluster_params=adapters:R, else 0."""
    return int(self.cluster_params.split(":")[1]) if self.cluster_params.startswith("adapters:") else 0

  def candidates(self) -> list[int]:
    """The K values of --k_candidates."""
    return [int(x) for x in self.k_candidates.split(",") if x.strip()]


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """A subword causal LM scored beside the page-level LMs (the paper's claim i; hetlm_jax/llm/, extra [llm])."""

  llm: str = _option(
    "",
    "A causal LM to score beside the page LMs on the same users and positions: a Hugging Face model name or folder "
    "(pip install 'hetlm_jax[llm]'), or scratch (a GPT-2-shaped subword LM of the page LM's size, trained from "
    "scratch on the pages' text: the tokenizer's effect alone); empty: none.",
    resumable=True,
  )
  llm_finetune: str = _option(
    "auto",
    "How --llm is trained on the training users' histories, stopped by the validation users as the page LMs are: "
    "none (zero-shot), lora, full, or auto (lora for a pretrained model, full for scratch).",
    resumable=True,
  )
  llm_pages: str = _option(
    "",
    "A JSON file {page id: text} naming pages for the LLM (msnbc's pages are their category names already); a page "
    "it does not name is its id.",
    resumable=True,
  )
  llm_rank_users: int = _option(
    200,
    "Evaluated users (a fixed seeded draw) whose first next page the LLM ranks over every page of the catalogue, "
    "for HR@10, NDCG@10 and the catalogue-renormalised NLL (each costs pages x subwords of scoring).",
    resumable=True,
  )
  llm_lora_rank: int = _option(8, "LoRA rank of --llm_finetune=lora.", resumable=True)
  llm_learning_rate: float = _option(
    0.0,
    "Peak AdamW learning rate of the LLM's warmup-then-cosine schedule (0: 2e-4 with LoRA, 5e-5 for a full "
    "fine-tune, --learning_rate from scratch).",
    resumable=True,
  )
  llm_batch_size: int = _option(
    8, "Windows per LLM training step (each the page LM's window, as text).", resumable=True
  )

  def finetune(self) -> str:
    """none, lora or full: --llm_finetune with auto resolved."""
    if self.llm_finetune != "auto":
      return self.llm_finetune
    return "full" if self.llm == "scratch" else "lora"


SECTIONS = {
  "model": ModelConfig,
  "train": TrainConfig,
  "data": DataConfig,
  "cluster": ClusterConfig,
  "llm": LLMConfig,
}


def options(section: str) -> list[dataclasses.Field]:
  """The fields of a section the user chooses (each a --flag), in order."""
  return [f for f in dataclasses.fields(SECTIONS[section]) if "derived" not in f.metadata]


def flag_name(field: dataclasses.Field) -> str:
  """The --flag of a chosen setting."""
  return field.metadata["flag"] or field.name


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a run, in five sections."""

  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  cluster: ClusterConfig = ClusterConfig()
  llm: LLMConfig = LLMConfig()

  def replace(self, **sections) -> Config:
    """A copy with whole sections replaced."""
    return dataclasses.replace(self, **sections)

  def to_dict(self) -> dict:
    """Every field of every section (derived ones included)."""
    return dataclasses.asdict(self)

  def chosen(self) -> dict:
    """What the user chose: every section without its derived fields (config.json)."""
    return {name: {f.name: getattr(getattr(self, name), f.name) for f in options(name)} for name in SECTIONS}

  def built(self, vocab_size: int) -> Config:
    """The config a run builds its models from: the model section completed with the tokenizer's `vocab_size`,
    and an output bias and LoRA rank as --cluster_params asks."""
    c = self.cluster
    return self.replace(
      model=dataclasses.replace(
        self.model, vocab_size=vocab_size, output_bias=c.cluster_params != "all", lora_rank=c.lora_rank()
      )
    )

  @classmethod
  def from_dict(cls, d: dict) -> Config:
    """The config of a dict of sections (missing fields take their defaults)."""
    unknown = set(d) - set(SECTIONS)
    if unknown:
      raise HetlmError(f"config: unknown sections {sorted(unknown)}")
    return cls(**{name: kind(**d.get(name, {})) for name, kind in SECTIONS.items()})

  def save(self, path: Path) -> None:
    """Writes what the user chose to `path` (config.json), atomically."""
    replace_text(path, json.dumps(self.chosen(), indent=2) + "\n")

  @classmethod
  def load(cls, path: Path) -> Config:
    """The config saved at `path` (a config.json from before derived fields were left out loads too)."""
    try:
      return cls.from_dict(json.loads(location(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
      raise HetlmError(f"{path}: not a readable hetlm config ({e})") from None


def resume_differences(saved: Config, now: Config) -> list[str]:
  """The chosen settings in which `now` differs from a run `saved` that it would resume, as "--flag: A there, B
  now"; settings a resumed run may change (resumable) are left out."""
  shown = lambda f, value: "auto" if value is not None and value == f.metadata["auto"] else value  # as typed
  return [
    f"--{flag_name(f)}: {shown(f, old)} there, {shown(f, new)} now"
    for name in SECTIONS
    for f in options(name)
    if not f.metadata["resumable"]
    and (old := getattr(getattr(saved, name), f.name)) != (new := getattr(getattr(now, name), f.name))
  ]


def parse_auto(field: dataclasses.Field, text: str):
  """The value of a flag that also takes "auto" (`field.metadata["auto"]`): "auto" or an integer of at least 1."""
  if text.strip().lower() == "auto":
    return field.metadata["auto"]
  try:
    value = int(text)
  except ValueError:
    raise HetlmError(f"--{flag_name(field)}={text}: expected an integer or auto") from None
  if value < 1:
    raise HetlmError(f"--{flag_name(field)}={text} must be at least 1 (or auto)")
  return value


def validate(cfg: Config) -> None:
  """Refuses out-of-range values with one line naming the flag, before anything is written."""
  m, t, d, c, x = cfg.model, cfg.train, cfg.data, cfg.cluster, cfg.llm
  checks = [
    (m.context >= 2, "--context must be at least 2"),
    (
      m.d_model >= 1 and m.n_layers >= 1 and m.n_heads >= 1 and m.d_ff >= 1,
      "--d_model, --n_layers, --n_heads and --d_ff must be positive",
    ),
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
    (
      t.data_shards >= 1 and t.batch_size % t.data_shards == 0,
      f"--data_shards={t.data_shards} must be at least 1 and divide --batch_size={t.batch_size}",
    ),
    (0.0 <= t.val_frac < 1.0, f"--val_frac={t.val_frac} must be in [0, 1)"),
    (
      t.val_frac > 0 or (t.patience == 0 and c.k != 0),
      "--val_frac=0 leaves no validation users: it needs --patience=0 and a fixed --k",
    ),
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
    (
      d.format in ("auto", "events", "msnbc", "user_items"),
      f"--format={d.format!r}: expected auto, events, msnbc or user_items",
    ),
    (d.session_gap_minutes > 0, f"--session_gap_minutes={d.session_gap_minutes} must be positive"),
    (d.holdout in ("auto", "half", "last"), f"--holdout={d.holdout!r}: expected auto, half or last"),
    (d.split in ("permutation", "hash"), f"--split={d.split!r}: expected permutation or hash"),
    (d.min_count >= 1, f"--min_count={d.min_count} must be at least 1"),
    (d.max_vocab == 0 or d.max_vocab >= 5, f"--max_vocab={d.max_vocab} must be 0 (no cap) or at least 5"),
    (d.max_users >= 0, f"--max_users={d.max_users} must be non-negative"),
    (d.test_users >= 0 and d.train_users >= 0, "--test_users and --train_users must be non-negative"),
    (d.test_users > 0 or d.train_users == 0, "--train_users needs --test_users (the split by user)"),
    (
      not d.own_users or (d.split == "hash" and c.init != "features" and not d.max_users),
      "--own_users needs --split=hash, --init=random or embedding, and no --max_users: the others need every user "
      "on every process",
    ),
    (d.test_offset >= -1, f"--test_offset={d.test_offset} must be -1 (after the training users) or a position"),
    (d.test_users > 0 or d.test_offset == -1, "--test_offset needs --test_users (the split by user)"),
    (
      d.test_users == 0 or c.k != 0,
      "--k=auto needs the split in time (no --test_users): it chooses K on held-out targets of the training users",
    ),
    (c.k >= 1 or c.k == 0, f"--k={c.k} must be at least 1 (or auto)"),
    (
      _ints(c.k_candidates) and all(x >= 1 for x in c.candidates()),
      f"--k_candidates={c.k_candidates!r}: expected positive integers separated by commas",
    ),
    (c.rounds >= 1, f"--rounds={c.rounds} must be at least 1"),
    (0.0 <= c.tolerance < 1.0, f"--tolerance={c.tolerance} must be in [0, 1)"),
    (c.init in ("random", "features", "embedding"), f"--init={c.init!r}: expected random, features or embedding"),
    (c.init_rounds >= 1, f"--init_rounds={c.init_rounds} must be at least 1"),
    (0.0 < c.warm_lr_scale <= 1.0, f"--warm_lr_scale={c.warm_lr_scale} must be in (0, 1]"),
    (c.prox >= 0.0, f"--prox={c.prox} must be non-negative"),
    (not c.tune_baselines or c.k != 0, "--tune_baselines needs a fixed --k (--k=auto already trains one HeTLM per K)"),
    (0.0 <= c.route_frac < 1.0, f"--route_frac={c.route_frac} must be in [0, 1)"),
    (0.0 <= c.min_cluster_frac < 1.0, f"--min_cluster_frac={c.min_cluster_frac} must be in [0, 1)"),
    (c.kmeans_users >= 1, f"--kmeans_users={c.kmeans_users} must be at least 1"),
    (c.cluster_axis >= 1, f"--cluster_axis={c.cluster_axis} must be at least 1"),
    (
      _cluster_params_ok(c.cluster_params, m.n_layers),
      f"--cluster_params={c.cluster_params!r}: expected all, head, top:N (1 <= N <= --n_layers={m.n_layers}) "
      "or adapters:R (R >= 1)",
    ),
    (
      x.llm_finetune in ("auto", "none", "lora", "full"),
      f"--llm_finetune={x.llm_finetune!r}: expected auto, none, lora or full",
    ),
    (
      x.llm != "scratch" or x.finetune() == "full",
      f"--llm=scratch is a model trained from scratch: it needs --llm_finetune=full (or auto), not {x.llm_finetune}",
    ),
    (x.llm_rank_users >= 0, f"--llm_rank_users={x.llm_rank_users} must be non-negative"),
    (x.llm_lora_rank >= 1, f"--llm_lora_rank={x.llm_lora_rank} must be at least 1"),
    (
      x.llm_learning_rate >= 0,
      f"--llm_learning_rate={x.llm_learning_rate} must be non-negative (0: by --llm_finetune)",
    ),
    (x.llm_batch_size >= 1, f"--llm_batch_size={x.llm_batch_size} must be at least 1"),
    (
      not x.llm or (d.test_users == 0 and not d.own_users),
      "--llm needs the split in time on one process (no --test_users, no --own_users): it is scored in PyTorch on "
      "the evaluated users' held-out targets",
    ),
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
