"""HeTLM's own flags against the same single LMs: each variant is a finished run's workdir with its single LMs
(init_single, single, single_matched) copied and HeTLM and single_ft trained again with other flags, so a grid
over --prox or --warm_lr_scale costs HeTLM's training, not the whole job's. Choose on the validation users
(eval.json "validation"), never on the evaluated ones; --pick prints the choice.

  python scripts/hetlm_variants.py --base=runs/main --out=runs/variants --grid=prox=0,1,10
  python scripts/hetlm_variants.py --out=runs/variants --pick

Only flags that leave the single LMs as they are may vary (see VARIABLE); extra arguments after `--` go to
every `hetlm train` and must be the base run's own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from hetlm_jax.config import ClusterConfig
from hetlm_jax.workdir import CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE, checkpoint_dir, is_finished, read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from regime_map import summarize, table

# ClusterConfig fields that only HeTLM's clusters and single_ft read (the single LMs train without them).
VARIABLE = ("prox", "interpolate", "warm_lr_scale", "rounds", "tolerance", "soft")
SINGLE_LMS = ("init_single", "single", "single_matched")


def seed_workdir(base: Path, workdir: Path, changes: dict[str, str]) -> None:
  """`workdir` holds `base`'s single LMs, config (with `changes`) and their metrics records, nothing of HeTLM."""
  workdir.mkdir(parents=True)
  config = json.loads((base / CONFIG_FILE).read_text())
  for key, value in changes.items():
    old = config["cluster"].get(key, getattr(ClusterConfig(), key))  # a config saved before the flag existed
    config["cluster"][key] = value == "true" if isinstance(old, bool) else type(old)(float(value))
  (workdir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  shutil.copy(base / TOKENIZER_FILE, workdir / TOKENIZER_FILE)
  for name in SINGLE_LMS:
    if checkpoint_dir(base, name).exists():
      shutil.copytree(checkpoint_dir(base, name), checkpoint_dir(workdir, name))
  kept = [r for r in read_metrics(base) if r.get("model", "init_single") in SINGLE_LMS and r["kind"] != "eval"]
  (workdir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", type=Path, help="a finished `hetlm train` workdir")
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--grid", default="", help="FLAG=V1,V2,... (one of: " + ", ".join(VARIABLE) + ")")
  parser.add_argument("--pick", action="store_true", help="print every variant and the one validation prefers")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  if args.grid:
    flag, _, values = args.grid.partition("=")
    if flag not in VARIABLE:
      parser.error(f"--grid: {flag} changes the single LMs; only {', '.join(VARIABLE)} may vary")
    for value in values.split(","):
      workdir = args.out / f"{flag}{value}"
      if not workdir.exists():
        seed_workdir(args.base, workdir, {flag: value})
      if not is_finished(workdir):
        command = [sys.executable, "-m", "hetlm_jax.main", "train", f"--workdir={workdir}", f"--{flag}={value}", *extra]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
  rows = [r for r in (summarize(d) for d in sorted(args.out.iterdir()) if d.is_dir()) if r]
  print(table(rows))
  if args.pick and rows:
    best = min((r for r in rows if r["validation"]["hetlm"] is not None), key=lambda r: r["validation"]["hetlm"])
    print(f"chosen by the validation users' per-user mean NLL: {best['run']} ({best['validation']['hetlm']:.4f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
