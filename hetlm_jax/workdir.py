"""A run's directory (--workdir): the name of every file in it, and every read and write of one.

  config.json          the settings the user chose (config.Config)
  tokenizer.json       the page vocabulary (data/tokenizer.py)
  sessions.json        whether the training histories end their sessions, and a generated session's length
  metrics.jsonl        one record per logged step, validation, round and stop (train/metrics.py)
  assignments.parquet  the cluster of every training user: user_id (as in the input), cluster
  assignments/         the same, from a job of several processes: one Parquet part per process (its own users)
                       and manifest.json, written last (read_assignments reads either)
  eval.json, report.md and its figures    the evaluation (eval/)
  tuned.json           --tune_baselines: which candidate family each tuned name is
  k_auto.json          --k=auto: the K chosen, and every candidate's validation NLL
  prepared/            the tokenized users, one Parquet part per process (its own users) and manifest.json, written
                       last: a resumed or re-evaluated run reads them instead of the log
  checkpoints/NAME/    orbax checkpoints of model family NAME (train/checkpoint.py)
  tensorboard/NAME/    --tensorboard event files
  .lock                the lock of the one command writing there (lock.py)

Training, evaluation, prediction, the benchmark and the scripts read a run through this module alone. A workdir is
a local folder or a gs:// or s3:// URI: every read and write here goes through files.py, which takes both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetlm_jax import hosts
from hetlm_jax.config import Config, ModelConfig, resume_differences
from hetlm_jax.data.ownership import owned_rows, owners
from hetlm_jax.data.prepare import Prepared, prepare_data
from hetlm_jax.data.sequences import UserSequences, session_length_from_data
from hetlm_jax.data.tokenizer import FILE_NAME as TOKENIZER_FILE
from hetlm_jax.data.tokenizer import PageTokenizer
from hetlm_jax.errors import HetlmError
from hetlm_jax.files import (
  Location,
  check_bucket,
  is_uri,
  location,
  make_dir,
  modified,
  read_parquet,
  remove_tree,
  replace_text,
  written,
)
from hetlm_jax.lock import LOCK_FILE as LOCK_FILE  # named here with the run's other files; lock.py holds the lock
from hetlm_jax.train.checkpoint import Checkpoints
from hetlm_jax.train.loop import Trainer
from hetlm_jax.train.metrics import MetricsLog, parse_records

CONFIG_FILE = "config.json"
SESSIONS_FILE = "sessions.json"
METRICS_FILE = "metrics.jsonl"
ASSIGNMENTS_FILE = "assignments.parquet"
ASSIGNMENTS_DIR = "assignments"
ASSIGNMENTS_MANIFEST = "manifest.json"
EVAL_FILE = "eval.json"
REPORT_FILE = "report.md"
NLL_FIGURE, ROUNDS_FIGURE, K_FIGURE = "nll_per_user.png", "rounds.png", "nll_vs_k.png"  # report.md's figures
TUNED_FILE = "tuned.json"
K_AUTO_FILE = "k_auto.json"
CHECKPOINTS_DIR = "checkpoints"
PREPARED_DIR = "prepared"
PREPARED_MANIFEST = "manifest.json"
TENSORBOARD_DIR = "tensorboard"

MIN_FREE_BYTES = 100 * 2**20  # a run's checkpoints and outputs need at least this much room to start


# -- before a run writes anything ----------------------------------------------------------------------------------


def check_workdir(workdir: Location) -> None:
  """Refuses a --workdir that is a file, lies under a file, cannot be written or sits on a full disk; on an object
  store, one whose bucket cannot be reached."""
  if is_uri(workdir):
    check_bucket(workdir)
    return
  existing = workdir
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == workdir else f"lies under {existing}, which is a file"
    raise HetlmError(f"--workdir={workdir} {where}, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise HetlmError(f"--workdir={workdir}: {existing} is not writable")
  free = shutil.disk_usage(existing).free
  if free < MIN_FREE_BYTES:
    raise HetlmError(
      f"--workdir={workdir}: the disk is full ({free / 2**20:.0f} MiB free; a run needs "
      f"{MIN_FREE_BYTES // 2**20} MiB to start)"
    )


def check_resumable(workdir: Location, cfg: Config) -> None:
  """Refuses to resume a run in `workdir` whose saved settings differ from `cfg` where a run cannot change."""
  if not (workdir / CONFIG_FILE).exists():
    return
  diffs = resume_differences(Config.load(workdir / CONFIG_FILE), cfg)
  if diffs:
    raise HetlmError(
      f"{workdir}: holds a run with different settings ({', '.join(diffs)}); "
      "pass the same flags to resume it, or use a new --workdir"
    )


def saved_tokenizer(workdir: Location) -> PageTokenizer | None:
  """The tokenizer of a run begun in `workdir` (a resumed run keeps its vocabulary), or None."""
  path = workdir / TOKENIZER_FILE
  return PageTokenizer.load(path) if path.exists() else None


def write_run_files(workdir: Location, cfg: Config, tokenizer: PageTokenizer, seqs: UserSequences) -> None:
  """config.json, tokenizer.json and sessions.json, by process 0 (the run's other files follow as it trains)."""
  length = session_length_from_data(seqs, tokenizer.num_specials)  # with --own_users, every process takes part
  if not hosts.is_primary():
    return
  make_dir(workdir)
  tokenizer.save(workdir / TOKENIZER_FILE)
  write_sessions(workdir, length)
  cfg.save(workdir / CONFIG_FILE)


def write_prepared(workdir: Location, cfg: Config, prepared: Prepared) -> None:
  """prepared/: each process writes the users it owns (data/ownership.py) of every role (the users of the run, its
  validation and test users of a split by user), with their position in that role; then process 0 writes
  manifest.json, which marks the folder complete."""
  process, processes = hosts.share()
  folder = workdir / PREPARED_DIR
  make_dir(folder)
  roles = {"users": prepared.seqs, "val": prepared.val_seqs, "test": prepared.test_seqs}
  tables = []
  for role, seqs in roles.items():
    if seqs is None:
      continue
    if hosts.own_users():  # every user a process holds is its own (by hash, or by its parts with --parts_by_user)
      mine_R = np.arange(seqs.num_users)
    else:
      mine_R = np.flatnonzero(owners(pa.array(seqs.user_ids.astype(str)), processes) == process)
    users = seqs.subset(mine_R).to_table()
    users = users.add_column(0, "index", pa.array(mine_R, pa.int64()))
    tables.append(users.add_column(0, "role", pa.array([role] * len(mine_R), pa.string())))
  name = f"part-{process:05d}-of-{processes:05d}.parquet"
  with written(folder / name, hidden=True) as tmp:
    pq.write_table(pa.concat_tables(tables), tmp)
  hosts.barrier("prepared parts written")
  if hosts.is_primary():
    manifest = {
      "data": cfg.data.path,
      "parts": [f"part-{p:05d}-of-{processes:05d}.parquet" for p in range(processes)],
      "roles": [role for role, seqs in roles.items() if seqs is not None],
      "stats": prepared.stats,
      "int_user_ids": prepared.int_user_ids,
    }
    replace_text(folder / PREPARED_MANIFEST, json.dumps(manifest, indent=1) + "\n")


def read_prepared(workdir: Location, cfg: Config) -> Prepared | None:
  """The prepared users of the run in `workdir` (every process reads every part; with --own_users, its own part
  alone), or None when there are none or they were prepared from other data than cfg's. With --own_users, parts
  of another number of processes stop the run in one line before anything is written: its checkpoints hold each
  process's users' clusters, so it resumes on as many processes only."""
  folder = workdir / PREPARED_DIR
  try:
    manifest = json.loads((folder / PREPARED_MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if manifest.get("data") != cfg.data.path or not (workdir / TOKENIZER_FILE).exists():
    return None
  process, processes = hosts.share()
  hosts.set_own_users(cfg.data.own_users)
  parts = manifest["parts"]
  if hosts.own_users():
    if len(parts) != processes:
      raise HetlmError(
        f"{folder}: prepared by {len(parts)} process(es), each keeping its own users (--own_users): run it on "
        f"{len(parts)} process(es), not {processes}, or move the folder away to start the run again"
      )
    parts = parts[process : process + 1]
  start = time.perf_counter()
  try:
    table = pa.concat_tables([read_parquet(folder / name) for name in parts])
  except (OSError, pa.ArrowException) as e:
    raise HetlmError(
      f"{folder}: the prepared users cannot be read ({e}); move the folder away to read the log"
    ) from None
  roles = {}
  for role in manifest["roles"]:
    roles[role] = UserSequences.from_table(table.filter(pc.equal(table["role"], role)).sort_by("index"))
  return Prepared(
    roles["users"],
    PageTokenizer.load(workdir / TOKENIZER_FILE),
    manifest["stats"],
    time.perf_counter() - start,
    manifest["int_user_ids"],
    roles.get("test"),
    roles.get("val"),
    saved=True,
  )


def open_metrics(workdir: Location, tensorboard: bool = False) -> MetricsLog:
  """metrics.jsonl (earlier sessions' records included), and TensorBoard's event files with `tensorboard`."""
  return MetricsLog(workdir / METRICS_FILE, workdir / TENSORBOARD_DIR if tensorboard else None)


def read_metrics(workdir: Location, kind: str | None = None) -> list[dict]:
  """The records of metrics.jsonl (of one `kind`, if given), read without a run: for scripts and reports."""
  path = location(workdir) / METRICS_FILE
  records = parse_records(path.read_text()) if path.exists() else []
  return [r for r in records if kind is None or r.get("kind") == kind]


def checkpoint_dir(workdir: Location, family: str) -> Location:
  """Where model family `family`'s checkpoints are."""
  return location(workdir) / CHECKPOINTS_DIR / family


# -- sessions.json and assignments.parquet -----------------------------------------------------------------------


def write_sessions(workdir: Location, length: int | None) -> None:
  """sessions.json: whether the training histories end their sessions (so a prediction asks for the next
  session's pages) or not (one session per user, as msnbc: it asks how the last session goes on), and then how
  many pages to generate (`length`: session_length_from_data)."""
  replace_text(workdir / SESSIONS_FILE, json.dumps({"session_ends": length is None, "session_length": length}) + "\n")


def read_sessions(workdir: Location) -> dict:
  """sessions.json of a run (a run from before it existed: sessions end, no length limit)."""
  try:
    return json.loads((workdir / SESSIONS_FILE).read_text())
  except (OSError, ValueError):
    return {"session_ends": True, "session_length": None}


def write_assignments(workdir: Location, seqs: UserSequences, assignment_U: np.ndarray, int_ids: bool) -> None:
  """The cluster of every training user (user_id as in the input, cluster). One process: assignments.parquet,
  replaced atomically. Several: each process writes the users it owns (data/ownership.py) as its part of
  assignments/, the parts named by a digest of the assignment so a round never overwrites the parts the manifest
  names; then process 0 writes assignments/manifest.json (what readers go by) and removes the previous parts. The
  form written last removes the other, so a run resumed with another number of processes leaves one."""
  process, processes = hosts.share()
  ids = pa.array(seqs.user_ids.astype(np.int64) if int_ids else seqs.user_ids.astype(str))
  table = pa.table({"user_id": ids, "cluster": pa.array(assignment_U, pa.int32())})
  folder = workdir / ASSIGNMENTS_DIR
  if processes == 1:
    with written(workdir / ASSIGNMENTS_FILE) as tmp:
      pq.write_table(table, tmp)
    remove_tree(folder)
    return
  tag = hashlib.sha256(np.ascontiguousarray(assignment_U, np.int32).tobytes()).digest()
  if hosts.own_users():  # each process holds its own users' clusters: the parts are named by all of them
    tag = hashlib.sha256(b"".join(bytes(d) for d in hosts.gather_bytes(tag))).digest()
  tag = tag.hex()[:12]
  (users,) = hosts.total(np.array(len(assignment_U)))
  names = [f"part-{p:05d}-of-{processes:05d}-{tag}.parquet" for p in range(processes)]
  make_dir(folder)
  with written(folder / names[process], hidden=True) as tmp:
    pq.write_table(table if hosts.own_users() else owned_rows(table, process, processes), tmp)
  hosts.barrier("assignment parts written")
  if hosts.is_primary():
    previous = _assignment_manifest(folder).get("parts", [])
    replace_text(folder / ASSIGNMENTS_MANIFEST, json.dumps({"parts": names, "users": int(users)}) + "\n")
    for name in set(previous) - set(names):
      (folder / name).unlink(missing_ok=True)
    (workdir / ASSIGNMENTS_FILE).unlink(missing_ok=True)


def _assignment_manifest(folder: Location) -> dict:
  try:
    return json.loads((folder / ASSIGNMENTS_MANIFEST).read_text())
  except (OSError, ValueError):
    return {}


def assignments_path(workdir: Location) -> Location | None:
  """Where a run's assignment is: assignments.parquet, or the manifest of assignments/ (the newer if both are
  there, as after a stop between writing one and removing the other); None when there is none."""
  found = [p for p in (workdir / ASSIGNMENTS_FILE, workdir / ASSIGNMENTS_DIR / ASSIGNMENTS_MANIFEST) if p.exists()]
  return max(found, key=modified) if found else None


def read_assignments(workdir: Location) -> pa.Table | None:
  """The run's assignment as one table (user_id, cluster), from either form (write_assignments); None when
  there is none. A part that cannot be read is one HetlmError line."""
  path = assignments_path(location(workdir))
  if path is None:
    return None
  try:
    if path.name == ASSIGNMENTS_FILE:
      return read_parquet(path)
    return pa.concat_tables([read_parquet(path.parent / name) for name in _assignment_manifest(path.parent)["parts"]])
  except (OSError, KeyError, pa.ArrowException) as e:
    raise HetlmError(f"{path}: the assignment cannot be read ({e})") from None


class SavedAssignment:
  """The assignment of a workdir (read_assignments): the cluster each training user ended in (none when there
  is none)."""

  def __init__(self, workdir: str | Location):
    saved = read_assignments(location(workdir))
    if saved is None:
      saved = pa.table({"user_id": pa.array([], pa.string()), "cluster": pa.array([], pa.int32())})
    self._ids, self._cluster = pc.cast(saved["user_id"], pa.string()), saved["cluster"].to_numpy()

  def lookup(self, user_ids: np.ndarray) -> np.ndarray:
    """[U] each user's saved cluster, -1 for a user the models never trained on."""
    found_U = pc.fill_null(pc.index_in(pa.array(np.asarray(user_ids).astype(str)), value_set=self._ids), -1).to_numpy()
    return np.where(found_U >= 0, self._cluster[np.maximum(found_U, 0)] if len(self._cluster) else -1, -1).astype(
      np.int32
    )


# -- which checkpoint folder a model name is ---------------------------------------------------------------------


def record_tuned(workdir: Location, name: str, chosen: str) -> None:
  """tuned.json: `name` (e.g. "hetlm") is the candidate family `chosen`; by process 0."""
  if not hosts.is_primary():
    return
  path = workdir / TUNED_FILE
  tuned = json.loads(path.read_text()) if path.exists() else {}
  tuned[name] = chosen
  replace_text(path, json.dumps(tuned, indent=1) + "\n")


def record_k_auto(workdir: Location, k: int, selection_nll: dict[int, float]) -> None:
  """k_auto.json: --k=auto chose `k` (its checkpoints stay under hetlm_kK); by process 0."""
  if hosts.is_primary():
    replace_text(workdir / K_AUTO_FILE, json.dumps({"k": k, "selection_nll": selection_nll}) + "\n")


def family_name(workdir: Location, model: str) -> str:
  """The checkpoint folder of a model name: with --k=auto, "hetlm" is the chosen hetlm_kK; with
  --tune_baselines, "hetlm" and "single_matched" are the candidates chosen (tuned.json); else `model`."""
  workdir = location(workdir)
  if model == "hetlm" and (workdir / K_AUTO_FILE).exists():
    return f"hetlm_k{json.loads((workdir / K_AUTO_FILE).read_text())['k']}"
  if (workdir / TUNED_FILE).exists():
    return json.loads((workdir / TUNED_FILE).read_text()).get(model, model)
  return model


# -- eval.json --------------------------------------------------------------------------------------------------

# What eval.json says about the training (not the evaluation); `hetlm evaluate` carries it over.
PROVENANCE = (
  "k",
  "rounds",
  "params",
  "hetlm_params",
  "train_s",
  "passes",
  "tokens_trained",
  "early_stopping",
  "hetlm_is_init_lm",
  "hetlm_clusters_as_init",
  "k_sweep",
  "validation",
  "tuning",
)


def read_eval(workdir: Location) -> dict | None:
  """The run's eval.json (None without a readable one)."""
  try:
    return json.loads((location(workdir) / EVAL_FILE).read_text())
  except (OSError, ValueError):
    return None


def training_provenance(workdir: Location) -> dict:
  """The PROVENANCE keys of the run's last eval.json ({} without one)."""
  previous = read_eval(workdir) or {}
  return {key: previous[key] for key in PROVENANCE if key in previous}


def is_finished(workdir: Location) -> bool:
  """Whether `hetlm train` finished in `workdir` (it writes eval.json last)."""
  return (location(workdir) / EVAL_FILE).exists()


# -- a trained run, loaded ---------------------------------------------------------------------------------------


def _require_run(workdir: Location) -> None:
  for name in (CONFIG_FILE, TOKENIZER_FILE):
    if not (workdir / name).exists():
      raise HetlmError(f"{workdir}: no {name}; is this a hetlm workdir?")


def built_config(workdir: Location) -> Config:
  """The run's config as its HeTLM was built: config.json completed with the vocabulary of tokenizer.json."""
  _require_run(workdir)
  return Config.load(workdir / CONFIG_FILE).built(PageTokenizer.load(workdir / TOKENIZER_FILE).vocab_size)


def run_data(workdir: Location, data: str | None) -> tuple[Config, Prepared]:
  """A run's config and its data (or `data`, in any format) prepared with the run's tokenizer."""
  _require_run(workdir)
  cfg = Config.load(workdir / CONFIG_FILE)
  if data:
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, path=data, format="auto"))
  return cfg, (None if data else read_prepared(workdir, cfg)) or prepare_data(
    cfg, PageTokenizer.load(workdir / TOKENIZER_FILE)
  )


def locate(path: Location) -> tuple[Location, str | None, int | None]:
  """(workdir, model family, step) of a workdir, a family's checkpoint folder or one of its steps."""
  if (path / CONFIG_FILE).exists() or not path.exists():
    return path, None, None
  step = int(path.name) if path.name.isdigit() else None
  family = path.parent if step is not None else path
  if family.parent.name == CHECKPOINTS_DIR and (family.parent.parent / CONFIG_FILE).exists():
    return family.parent.parent, family.name, step
  return path, None, None


@dataclasses.dataclass
class TrainedRun:
  """One trained model family of a run, with what it needs to read new data."""

  config: Config
  tokenizer: PageTokenizer
  params: object  # stacked: leading K axis
  assignment: np.ndarray  # cluster of each user, in the order of the training data's users
  step: int
  weights: np.ndarray | None = None  # [U, K] soft-EM responsibilities (--soft), else None
  trainer: Trainer | None = None  # the compiled scoring and decoding of these K models, on the devices loaded onto
  meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's meta: the run position, K, the model


def load_run(workdir: str | Location, model: str = "hetlm", step: int | None = None, devices=None) -> TrainedRun:
  """Loads a trained model family from its workdir alone (config.json, tokenizer.json, the latest checkpoint or
  `step`), onto `devices` (default: every device; the mesh's batch and cluster axes are fitted to them)."""
  workdir = location(workdir)
  _require_run(workdir)
  cfg = Config.load(workdir / CONFIG_FILE)
  tokenizer = PageTokenizer.load(workdir / TOKENIZER_FILE)
  model = family_name(workdir, model)
  if not checkpoint_dir(workdir, model).is_dir():
    there = sorted(p.name for p in (workdir / CHECKPOINTS_DIR).glob("*") if p.is_dir())
    raise HetlmError(f"{workdir}: no checkpoint of {model} (models there: {', '.join(there) or 'none yet'})")
  ckpts = Checkpoints(checkpoint_dir(workdir, model), cfg.train.keep_checkpoints)
  try:
    steps = ckpts.all_steps()
    if not steps or (step is not None and step not in steps):
      raise HetlmError(f"{workdir}: no checkpoint of {model} " + ("yet" if step is None else f"at step {step}"))
    meta = ckpts.meta(step)  # each model family records its own K and model config
    cfg = cfg.replace(model=ModelConfig(**meta["model"]))
    if devices is not None:
      cfg = fitted_to(cfg, len(devices))
    trainer = Trainer(cfg, int(meta["k"]), devices)
    state, _, assignment, meta, weights = ckpts.restore(trainer.abstract, int(meta["num_users"]), step, every_user=True)
    if "mix" in meta:  # --mix_init: the LM it mixes with was saved beside it
      trainer.set_mix(ckpts.restore_anchor(trainer.anchor_shape(), step), meta["mix"])
  finally:
    ckpts.close()
  return TrainedRun(cfg, tokenizer, state.params, assignment, int(meta["step"]), weights, trainer, dict(meta))


def fitted_to(cfg: Config, n_devices: int) -> Config:
  """The run's config on `n_devices` devices that need not be the training's: every device on the batch
  axis, the batch rounded up to fill them (only loading and scoring use it)."""
  batch = -(-cfg.train.batch_size // n_devices) * n_devices
  return cfg.replace(
    train=dataclasses.replace(cfg.train, batch_size=batch), cluster=dataclasses.replace(cfg.cluster, cluster_axis=1)
  )
