"""Does clustering pay as the data grows? HeTLM against the single LMs at several training sizes, by DESIGN.md's
msnbc protocol (split by user), with one test set for every size.

  python scripts/data_scaling.py --data=msnbc990928.zip --out=runs/scaling --sizes=10000,100000,0 --k=4,16
  python scripts/data_scaling.py --data=msnbc990928.zip --out=runs/scaling --cells=10000/4/all/32,100000/16/head/64
  python scripts/data_scaling.py --out=runs/scaling --plot=docs/data_scaling.png   # tabulate and plot only

The users are permuted with numpy.random.default_rng(0).permutation(N); the --test_users users from position
--test_offset (DESIGN.md's: the 100,000 after the first 100,000) are the test of every run, and each run trains on
the first SIZE of the other users (0: all of them), its validation users the next --val_frac x SIZE (for 0: that
share of the training users, taken out of training). The grid is the product of --sizes, --k, --params and
--d_model (d_ff 4 x d_model), or the --cells listed (SIZE/K/PARAMS/D_MODEL). Every cell is one `hetlm train` in
its own workdir under --out, so an interrupted grid resumes where it stopped; extra arguments after `--` go to
every run.

Writes --out/data_scaling.json (a list, one object per finished cell; rewritten after every cell) and, with
--plot, a PNG: per training size (x, log scale, in training tokens) HeTLM − `single` and HeTLM −
`single_matched`, per-user mean NLL and variance, with the paired-bootstrap 95% intervals of eval.json, one line
per setting, and the pooled bits per page token of the models. Rows are read with regime_map.py's summarize(), and
the table and interval colours are its own. Compute: every model's training tokens and model FLOPs
(bench/flops.py's count, 6 x matmul parameters + attention, per token trained); HeTLM's include the init LM it
starts from, and so do `single_ft`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from hetlm_jax.bench.flops import model_flops_per_token
from hetlm_jax.files import replace_text
from hetlm_jax.model import matched_config
from hetlm_jax.workdir import built_config, is_finished, read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from regime_map import color, delta, markdown, summarize

MODELS = ("hetlm", "single", "single_ft", "single_matched")
AGAINST = ("single", "single_matched")  # the two readings: equal training compute, equal parameters


@dataclasses.dataclass(frozen=True)
class Cell:
  size: int  # training users; 0: all the users neither test nor validation
  k: int
  params: str
  d_model: int

  @property
  def name(self) -> str:
    return f"u{self.size or 'all'}_k{self.k}_{self.params.replace(':', '')}_d{self.d_model}"

  @property
  def setting(self) -> str:
    return f"K={self.k}, {self.params}, d_model {self.d_model}"

  @classmethod
  def parse(cls, name: str) -> Cell | None:
    """The cell whose workdir is called `name` (None for any other folder)."""
    m = re.fullmatch(r"u(all|\d+)_k(\d+)_([a-z]+)(\d*)_d(\d+)", name)
    if m is None:
      return None
    size, k, kind, n, d_model = m.groups()
    return cls(0 if size == "all" else int(size), int(k), f"{kind}:{n}" if n else kind, int(d_model))

  def flags(self) -> list[str]:
    return [
      f"--train_users={self.size}",
      f"--k={self.k}",
      f"--cluster_params={self.params}",
      f"--d_model={self.d_model}",
      f"--d_ff={4 * self.d_model}",
    ]


def cells(args) -> list[Cell]:
  if args.cells:
    out = []
    for text in args.cells.split(","):
      size, k, params, d_model = text.split("/")
      out.append(Cell(int(size), int(k), params, int(d_model)))
    return out
  ints = lambda text: [int(x) for x in text.split(",") if x]
  return [
    Cell(size, k, params, d)
    for size in ints(args.sizes)
    for k in ints(args.k)
    for params in args.params.split(",")
    for d in ints(args.d_model)
  ]


def compute(workdir: Path, row: dict) -> dict:
  """{model: {"tokens": tokens trained, "flops": model FLOPs}}, counting the init LM in HeTLM's and single_ft's."""
  cfg = built_config(workdir)
  single = dataclasses.replace(cfg.model, lora_rank=0)
  per_token = {
    "hetlm": model_flops_per_token(cfg.model),
    "single": model_flops_per_token(single),
    "single_ft": model_flops_per_token(single),
    "single_matched": model_flops_per_token(matched_config(single, row["params"]["hetlm"])),
  }
  tokens = row.get("tokens_trained") or {}
  init = tokens.get("init_single", 0)
  out = {}
  for model in MODELS:
    if model in tokens:
      own = tokens[model]
      warm = model in ("hetlm", "single_ft")  # they go on from the init LM: its training is theirs too
      out[model] = {
        "tokens": own + (init if warm else 0),
        "flops": own * per_token[model] + (init * per_token["single"] if warm else 0.0),
      }
  return out


def row(cell: Cell, workdir: Path) -> dict | None:
  """summarize()'s row of a finished cell, with its setting, training data size, pooled bits and compute."""
  base = summarize(workdir)
  if base is None:
    return None
  start = read_metrics(workdir, "start")[0]
  bits = base["bits_per_token"] or {}
  return {
    **base,
    "cell": dataclasses.asdict(cell),
    "setting": cell.setting,
    "train_users": start["train_users"],
    "train_tokens": start["train_tokens"],
    "test_users": base["n_users"],
    "bits_per_page_token": {m: bits[m]["no_end"] for m in bits},
    "compute": compute(workdir, base),
  }


def table(rows: list[dict]) -> str:
  header = [
    "training users",
    "training tokens",
    "setting",
    "bits/page token: HeTLM / single / single_ft / single_matched",
    *(f"− {o}: Δ {w}" for o in AGAINST for w in ("mean", "var")),
    "tokens trained: HeTLM / single / single_matched",
    "PFLOP: HeTLM / single / single_matched",
  ]
  lines = []
  for r in rows:
    bits, comp = r["bits_per_page_token"], r["compute"]
    lines.append(
      [
        f"{r['train_users']:,}",
        f"{r['train_tokens']:,}",
        r["setting"],
        " / ".join(f"{bits[m]:.4f}" if m in bits else "–" for m in MODELS),
        *(delta(r["vs"][o], w) if o in r["vs"] else "–" for o in AGAINST for w in ("mean", "var")),
        " / ".join(f"{comp[m]['tokens']:,}" if m in comp else "–" for m in ("hetlm", *AGAINST)),
        " / ".join(f"{comp[m]['flops'] / 1e15:.3g}" if m in comp else "–" for m in ("hetlm", *AGAINST)),
      ]
    )
  return markdown(header, lines)


def plot(rows: list[dict], path: Path) -> None:
  """Rows: HeTLM − single, HeTLM − single_matched; columns: Δ mean, Δ variance (each point coloured as the regime
  map colours it, one line style per setting), and the pooled bits per page token of HeTLM and the other LM."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  settings = sorted({r["setting"] for r in rows})
  styles = dict(zip(settings, ("-", "--", ":", "-.") * len(settings)))
  markers = dict(zip(settings, "osD^v<>ph" * len(settings)))
  fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), squeeze=False)
  for axes_row, other in zip(axes, AGAINST):
    for setting in settings:
      mine = sorted((r for r in rows if r["setting"] == setting and other in r["vs"]), key=lambda r: r["train_tokens"])
      x = [r["train_tokens"] for r in mine]
      for ax, which in ((axes_row[0], "mean"), (axes_row[1], "var")):
        y = [r["vs"][other][f"{which}_diff"] for r in mine]
        ax.plot(x, y, styles[setting], color="black", linewidth=0.8, label=setting)
        for xi, r in zip(x, mine):
          d = r["vs"][other]
          lo, hi = d[f"{which}_ci"]
          ax.errorbar(
            xi,
            d[f"{which}_diff"],
            yerr=[[d[f"{which}_diff"] - lo], [hi - d[f"{which}_diff"]]],
            fmt=markers[setting],
            color=color(d[f"{which}_ci"]),
            capsize=3,
          )
      bits = axes_row[2]
      for model, shade in (("hetlm", "tab:blue"), (other, "tab:orange")):
        bits.plot(
          x,
          [r["bits_per_page_token"][model] for r in mine],
          styles[setting],
          marker=markers[setting],
          color=shade,
          label=f"{model}, {setting}",
        )
    for ax, title in ((axes_row[0], "Δ mean per-user NLL"), (axes_row[1], "Δ variance over users")):
      ax.axhline(0, color="black", linewidth=0.8)
      ax.set_title(f"HeTLM − {other}: {title}\n(below 0: HeTLM better; green/red: 95% CI excludes 0)", fontsize=9)
      ax.set_ylabel("nats per target token" if title.startswith("Δ mean") else "(nats per target token)²")
    axes_row[2].set_title(f"pooled bits per page token: HeTLM and {other}", fontsize=9)
    axes_row[2].legend(fontsize=6)
    for ax in axes_row:
      ax.set_xscale("log")
      ax.set_xlabel("training tokens (log scale)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", help="the msnbc file (msnbc990928.zip); needed to run cells, not to tabulate")
  parser.add_argument("--out", type=Path, required=True, help="folder of the runs' workdirs and data_scaling.json")
  parser.add_argument("--sizes", default="10000,100000,0", help="training users per run (0: all the others)")
  parser.add_argument("--k", default="4,16")
  parser.add_argument("--params", default="all", help="--cluster_params values, separated by commas")
  parser.add_argument("--d_model", default="64,32")
  parser.add_argument("--cells", default="", help="SIZE/K/PARAMS/D_MODEL,... instead of the product above")
  parser.add_argument("--test_users", type=int, default=100_000)
  parser.add_argument("--test_offset", type=int, default=100_000, help="where the test users start in the permutation")
  parser.add_argument("--plot", type=Path, help="write the curve of every finished cell to this PNG")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  args.out.mkdir(parents=True, exist_ok=True)
  grid = cells(args)
  for cell in grid if args.data else []:
    workdir = args.out / cell.name
    if not is_finished(workdir):
      start = time.perf_counter()
      cmd = [
        sys.executable,
        "-m",
        "hetlm_jax",
        "train",
        f"--workdir={workdir}",
        f"--data={args.data}",
        f"--test_users={args.test_users}",
        f"--test_offset={args.test_offset}",
        *cell.flags(),
        *extra,
      ]
      print(" ".join(cmd[2:]), flush=True)
      with open(args.out / f"{cell.name}.log", "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
      if done.returncode:
        print(f"  {cell.name}: failed (exit {done.returncode}); see {args.out / cell.name}.log", flush=True)
        return done.returncode
      print(f"  {cell.name}: {time.perf_counter() - start:.0f} s", flush=True)
    _write(args.out)
  rows = _write(args.out)
  print(table(rows))
  if args.plot and rows:
    plot(rows, args.plot)
  return 0


def _write(out: Path) -> list[dict]:
  """Every finished cell's row under `out`, written whole to data_scaling.json."""
  found = ((Cell.parse(p.name), p) for p in sorted(out.iterdir()) if p.is_dir())
  rows = sorted(
    (r for r in (row(cell, p) for cell, p in found if cell) if r), key=lambda r: (r["setting"], r["train_tokens"])
  )
  replace_text(out / "data_scaling.json", json.dumps(rows, indent=1) + "\n")
  return rows


if __name__ == "__main__":
  sys.exit(main())
