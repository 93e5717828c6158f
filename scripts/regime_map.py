"""The regime map: where does clustering pay? Runs `hetlm train` once per setting and tabulates HeTLM minus each
single LM (`single`, the K=1 control `single_ft`, `single_matched`: per-user mean NLL and its variance over users,
with the paired-bootstrap 95% intervals that eval.json holds), then plots the map. scripts/data_scaling.py and
scripts/hetlm_variants.py read their runs with the same summarize().

  python scripts/regime_map.py --out=runs/regime --grid=context                # 8|64 x all|top:1|head|adapters:8
  python scripts/regime_map.py --out=runs/regime --grid=k --settings=64/all,8/head   # K 2|4|8 and soft EM
  python scripts/regime_map.py --out=runs/regime --plot=docs/regime_map.png          # tabulate and plot only

Every run is its own workdir under --out, so an interrupted map resumes where it stopped; extra arguments
after `--` go to every `hetlm train` (e.g. `-- --data=msnbc990928.zip --test_users=...`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hetlm_jax.files import replace_text
from hetlm_jax.workdir import is_finished, read_eval, read_metrics

_PARAMS = ("all", "top:1", "head", "adapters:8")


def grid(kind: str, settings: list[str]) -> dict[str, list[str]]:
  """{run name: hetlm train flags}."""
  runs = {}
  if kind == "context":
    for context in (8, 64):
      for params in _PARAMS:
        runs[f"ctx{context}_{params.replace(':', '')}_k4_hard"] = [
          f"--context={context}",
          f"--cluster_params={params}",
          "--k=4",
          "--nosoft",
        ]
  elif kind == "k":
    for setting in settings:
      context, params = setting.split("/")
      for k, soft in ((2, False), (8, False), (4, True)):
        name = f"ctx{context}_{params.replace(':', '')}_k{k}_{'soft' if soft else 'hard'}"
        runs[name] = [
          f"--context={context}",
          f"--cluster_params={params}",
          f"--k={k}",
          "--soft" if soft else "--nosoft",
        ]
  return runs


BASELINES = ("single", "single_ft", "single_matched")  # HeTLM − each, where eval.json has the pair


def summarize(workdir: Path) -> dict | None:
  """One finished run's row, from its eval.json: every model's mean, HeTLM − each single LM (per-user mean and
  variance with the paired-bootstrap 95% intervals eval.json holds), validation figures, passes and tokens."""
  report = read_eval(workdir)
  if report is None:
    return None
  models = report["models"]
  metric = "nll_no_end" if report.get("protocol") == "new_users" else "nll"
  boot = report["bootstrap"]
  # Settings are compared on the validation users, never on the evaluated ones: each model's per-user mean
  # validation NLL (eval.json's "validation"; runs from before it existed: the last stop record's pooled NLL).
  last_stop, hetlm_stops = {}, []
  for record in read_metrics(workdir, "stop"):
    last_stop[record["model"]] = record["validation_nll"]
    hetlm_stops += [record] if record["model"] == "hetlm" else []
  validation = {m: v["mean"] for m, v in report["validation"].items()} if "validation" in report else last_stop
  is_init = report.get("hetlm_is_init_lm", len(hetlm_stops) == 1 and hetlm_stops[0]["best_pass"] == 0)
  vs = {
    o: {k: boot[f"hetlm-{o}"][metric][k] for k in ("mean_diff", "mean_ci", "var_diff", "var_ci")}
    for o in BASELINES
    if f"hetlm-{o}" in boot
  }
  return {
    "run": workdir.name,
    "metric": metric,
    "k": report["k"],
    "rounds": report["rounds"],
    "validation": {m: validation.get(m) for m in ("hetlm", *BASELINES)},
    "is_init_lm": is_init,
    **{m: models[m][metric]["mean"] for m in ("hetlm", *BASELINES) if m in models},
    "markov": models.get("markov", {}).get(metric, {}).get("mean"),
    "vs": vs,
    "params": report["params"],
    "passes": report.get("passes"),
    "tokens_trained": report.get("tokens_trained"),
    "train_s": report.get("train_s"),
    "n_users": report.get("n_users"),
    "bits_per_token": report.get("bits_per_token"),
  }


def delta(d: dict, which: str) -> str:
  """'+0.0012 [-0.0003, +0.0027]' for d[which_diff] and its interval (which: mean or var)."""
  lo, hi = d[f"{which}_ci"]
  return f"{d[f'{which}_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def color(ci: list[float]) -> str:
  """Green where the interval favours HeTLM (below 0), red where it favours the other model, grey if it holds 0."""
  return "tab:green" if ci[1] < 0 else "tab:red" if ci[0] > 0 else "tab:gray"


def markdown(header: list[str], lines: list[list[str]]) -> str:
  return "\n".join(
    ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(line) + " |" for line in lines]
  )


def table(rows: list[dict]) -> str:
  """The map's Markdown table: validation means (the only column settings are chosen by), held-out means and
  HeTLM − each single LM."""
  others = [o for o in BASELINES if any(o in r["vs"] for r in rows)]
  header = [
    "run",
    "K",
    "rounds",
    "HeTLM passes",
    "validation: HeTLM / " + " / ".join(others),
    "HeTLM",
    *others,
    *(f"− {o}: Δ {w}" for o in others for w in ("mean", "var")),
  ]
  lines = []
  for r in rows:
    v = r["validation"]
    val = " / ".join("–" if v.get(m) is None else f"{v[m]:.4f}" for m in ("hetlm", *others))
    passes = (r.get("passes") or {}).get("hetlm")
    lines.append(
      [
        r["run"],
        str(r["k"]),
        str(r["rounds"]),
        ("–" if passes is None else f"{passes:g}") + (" (= init LM)" if r["is_init_lm"] else ""),
        val,
        f"{r['hetlm']:.4f}",
        *(f"{r[o]:.4f}" if o in r else "–" for o in others),
        *(delta(r["vs"][o], w) if o in r["vs"] else "–" for o in others for w in ("mean", "var")),
      ]
    )
  return markdown(header, lines)


def label(run: str) -> str:
  """'ctx64_adapters8_k4_hard' → 'context 64, adapters:8, K=4, hard'."""
  context, params, k, em = run.split("_")
  params = params.replace("top", "top:").replace("adapters", "adapters:")
  return f"context {context[3:]}, {params}, K={k[1:]}, {em}"


def plot(rows: list[dict], path: Path, against: tuple[str, ...] = ("single_ft", "single_matched")) -> None:
  """One row of panels per single LM in `against` (mean, variance): HeTLM − it per run, with its interval."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  against = [o for o in against if any(o in r["vs"] for r in rows)]
  fig, axes = plt.subplots(
    len(against), 2, figsize=(12, len(against) * (0.4 * len(rows) + 1.6)), sharey=True, squeeze=False
  )
  for axes_row, other in zip(axes, against):
    for ax, which, title in (
      (axes_row[0], "mean", "Δ mean per-user NLL"),
      (axes_row[1], "var", "Δ variance over users"),
    ):
      for i, r in enumerate(rows):
        if other in r["vs"]:
          d = r["vs"][other]
          lo, hi = d[f"{which}_ci"]
          ax.errorbar(
            d[f"{which}_diff"],
            i,
            xerr=[[d[f"{which}_diff"] - lo], [hi - d[f"{which}_diff"]]],
            fmt="o",
            color=color(d[f"{which}_ci"]),
            capsize=3,
          )
      ax.axvline(0, color="black", linewidth=0.8)
      ax.set_title(f"HeTLM − {other}: {title}\n(left of 0: HeTLM better; green/red: 95% CI excludes 0)", fontsize=9)
      ax.set_xlabel("nats per target token" if which == "mean" else "(nats per target token)²")
    axes_row[0].set_yticks(
      range(len(rows)), [label(r["run"]) + (" (= init LM)" if r["is_init_lm"] else "") for r in rows], fontsize=8
    )
  axes[0][0].invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder of the runs' workdirs")
  parser.add_argument("--grid", choices=("context", "k", "none"), default="none")
  parser.add_argument("--settings", default="", help="for --grid=k: CONTEXT/PARAMS,... e.g. 64/all,8/head")
  parser.add_argument("--plot", help="write the map of every finished run under --out to this PNG")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name, flags in grid(args.grid, [s for s in args.settings.split(",") if s]).items():
    if is_finished(out / name):
      continue
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "hetlm_jax", "train", f"--workdir={out / name}", *flags, *extra]
    print(" ".join(cmd[2:]), flush=True)
    with open(out / f"{name}.log", "w") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
  rows = [r for r in (summarize(d) for d in sorted(out.iterdir()) if d.is_dir()) if r]
  replace_text(out / "regime_map.json", json.dumps(rows, indent=1) + "\n")
  print(table(rows))
  if args.plot and rows:
    plot(rows, Path(args.plot))
  return 0


if __name__ == "__main__":
  sys.exit(main())
