"""The regime map: where does clustering pay? Runs `hetlm train` once per setting and tabulates HeTLM minus
`single_matched` (per-user mean NLL and its variance over users, with the paired-bootstrap 95% intervals that
eval.json holds), then plots the map.

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

_PARAMS = ("all", "top:1", "head", "adapters:8")


def grid(kind: str, settings: list[str]) -> dict[str, list[str]]:
  """{run name: hetlm train flags}."""
  runs = {}
  if kind == "context":
    for context in (8, 64):
      for params in _PARAMS:
        runs[f"ctx{context}_{params.replace(':', '')}_k4_hard"] = [f"--context={context}",
                                                                    f"--cluster_params={params}", "--k=4", "--nosoft"]
  elif kind == "k":
    for setting in settings:
      context, params = setting.split("/")
      for k, soft in ((2, False), (8, False), (4, True)):
        name = f"ctx{context}_{params.replace(':', '')}_k{k}_{'soft' if soft else 'hard'}"
        runs[name] = [f"--context={context}", f"--cluster_params={params}", f"--k={k}",
                      "--soft" if soft else "--nosoft"]
  return runs


def summarize(workdir: Path) -> dict | None:
  """The map's row for one finished run, from its eval.json."""
  path = workdir / "eval.json"
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  models = report["models"]
  metric = "nll_no_end" if report.get("protocol") == "new_users" else "nll"
  b = report["bootstrap"]["hetlm-single_matched"][metric]
  # Settings are compared on the validation users, never on the evaluated ones: each model's per-user mean
  # validation NLL (eval.json's "validation"; runs from before it existed: the last stop record's pooled NLL).
  last_stop, hetlm_stops = {}, []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["kind"] == "stop":
      last_stop[record["model"]] = record["validation_nll"]
      hetlm_stops += [record] if record["model"] == "hetlm" else []
  validation = {m: v["mean"] for m, v in report["validation"].items()} if "validation" in report else last_stop
  is_init = report.get("hetlm_is_init_lm", len(hetlm_stops) == 1 and hetlm_stops[0]["best_pass"] == 0)
  return {"validation": {m: validation.get(m) for m in ("hetlm", "single", "single_matched")}, "is_init_lm": is_init,
          "run": workdir.name, "metric": metric, "k": report["k"], "rounds": report["rounds"],
          "hetlm": models["hetlm"][metric]["mean"], "single": models["single"][metric]["mean"],
          "single_matched": models["single_matched"][metric]["mean"],
          "markov": models.get("markov", {}).get(metric, {}).get("mean"),
          "mean_diff": b["mean_diff"], "mean_ci": b["mean_ci"], "var_diff": b["var_diff"], "var_ci": b["var_ci"],
          "params": report["params"], "passes": report.get("passes"), "train_s": report.get("train_s")}


def label(run: str) -> str:
  """'ctx64_adapters8_k4_hard' → 'context 64, adapters:8, K=4, hard'."""
  context, params, k, em = run.split("_")
  params = params.replace("top", "top:").replace("adapters", "adapters:")
  return f"context {context[3:]}, {params}, K={k[1:]}, {em}"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
  y = range(len(rows))
  for ax, which, title in ((axes[0], "mean", "Δ mean per-user NLL"), (axes[1], "var", "Δ variance over users")):
    diff = [r[f"{which}_diff"] for r in rows]
    lo = [r[f"{which}_diff"] - r[f"{which}_ci"][0] for r in rows]
    hi = [r[f"{which}_ci"][1] - r[f"{which}_diff"] for r in rows]
    colors = ["tab:green" if r[f"{which}_ci"][1] < 0 else "tab:red" if r[f"{which}_ci"][0] > 0 else "tab:gray"
              for r in rows]
    for i in y:
      ax.errorbar(diff[i], i, xerr=[[lo[i]], [hi[i]]], fmt="o", color=colors[i], capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title(f"HeTLM − single_matched: {title}\n(left of 0: HeTLM better; green/red: 95% CI excludes 0)",
                 fontsize=9)
    ax.set_xlabel("nats per target token" if which == "mean" else "(nats per target token)²")
  axes[0].set_yticks(list(y), [label(r["run"]) + (" (= init LM)" if r["is_init_lm"] else "") for r in rows],
                     fontsize=8)
  axes[0].invert_yaxis()
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
    if (out / name / "eval.json").exists():
      continue
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "hetlm_jax", "train", f"--workdir={out / name}", *flags, *extra]
    print(" ".join(cmd[2:]), flush=True)
    with open(out / f"{name}.log", "w") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
  rows = [r for r in (summarize(d) for d in sorted(out.iterdir()) if d.is_dir()) if r]
  (out / "regime_map.json").write_text(json.dumps(rows, indent=1) + "\n")
  print("| run | K | rounds | validation Δ | HeTLM | single | single_matched | Δ mean [95% CI] | Δ var [95% CI] |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    v = r["validation"]
    val = f"{v['hetlm'] - v['single_matched']:+.4f}" if None not in (v["hetlm"], v["single_matched"]) else "–"
    print(f"| {r['run']} | {r['k']} | {r['rounds']} | {val} | {r['hetlm']:.4f} | {r['single']:.4f} | "
          f"{r['single_matched']:.4f} | {r['mean_diff']:+.4f} [{r['mean_ci'][0]:+.4f}, {r['mean_ci'][1]:+.4f}] | "
          f"{r['var_diff']:+.4f} [{r['var_ci'][0]:+.4f}, {r['var_ci'][1]:+.4f}] |")
  if args.plot and rows:
    plot(rows, Path(args.plot))
  return 0


if __name__ == "__main__":
  sys.exit(main())
