"""report.md: the headline table (generation alignment and per-user NLL, HeTLM against the single LMs), the
side-by-side table, the paired bootstrap, per-cluster figures, and PNG figures beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hetlm_jax.files import replace_text, written
from hetlm_jax.workdir import K_FIGURE, NLL_FIGURE, REPORT_FILE, ROUNDS_FIGURE

_ORDER = (
  "hetlm",
  "hetlm_mixture",
  "single",
  "single_ft",
  "single_matched",
  "markov_mixture",
  "markov_mixture_k40",
  "markov",
  "popularity",
  "llm_scratch",
  "llm_zeroshot",
  "llm_lora",
  "llm_full",
)
_METRICS = (
  "nll",
  "nll_no_end",
  "catalogue_nll",
  "hr@10",
  "ndcg@10",
  "mrr",
  "hr@10_sampled",
  "ndcg@10_sampled",
  "edit_similarity",
  "rouge_l_f1",
)
# The paper's headline: how well the generated next session matches the actual one, and per-user NLL.
_HEADLINE = ("edit_similarity", "jaccard", "rouge_l_f1", "nll")
_HEADLINE_NEW_USERS = ("nll", "nll_no_end")  # the split by user generates nothing
_SINGLES = ("single", "single_ft", "single_matched")


def _fmt(x) -> str:
  return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def _interval(boot: dict, which: str) -> str:
  """'diff [lo, hi]' of a paired_bootstrap result, `which` 'mean' or 'var'."""
  lo, hi = boot.get(f"{which}_ci") or (None, None)
  return f"{_fmt(boot.get(f'{which}_diff'))} [{_fmt(lo)}, {_fmt(hi)}]"


def _unknown_note(report: dict) -> str:
  n = report.get("unknown_targets", 0)
  if not n:
    return ""
  return (
    f" {n:,} of these users' ranked page never appeared in training: no model can name it, so it counts "
    "as a miss for every model."
  )


def _headline(report: dict) -> list[str]:
  """HeTLM against each single LM, per headline metric: mean and variance over users, and the paired-bootstrap
  95% intervals of HeTLM − other for both."""
  models = report["models"]
  if "hetlm" not in models:
    return []
  new_users = report.get("protocol") == "new_users"
  metrics = [m for m in (_HEADLINE_NEW_USERS if new_users else _HEADLINE) if m in models["hetlm"]]
  boot = report.get("bootstrap", {})
  others = [o for o in _SINGLES if f"hetlm-{o}" in boot and o in models] or [None]
  if new_users:
    lead = "HeTLM against the single LMs, per new user: NLL with and without the end marker (lower is better)."
  else:
    lead = (
      "HeTLM against the single LMs, per user: how well the generated next session matches the actual one "
      f"({report.get('generated_users', 0):,} users; edit similarity, Jaccard and ROUGE-L F1, higher is "
      "better) and the held-out NLL (lower is better)."
    )
  lines = [
    lead + " Mean and variance over users; Δ = HeTLM − other, with paired-bootstrap 95% intervals.",
    "",
    "| metric | vs | HeTLM mean | other mean | Δ mean [95% CI] | HeTLM var | other var | Δ var [95% CI] |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for metric in metrics:
    h = models["hetlm"][metric]
    for other in others:
      o = models[other].get(metric, {}) if other else {}
      b = boot[f"hetlm-{other}"].get(metric, {}) if other else {}
      lines.append(
        f"| {metric} | {other or '–'} | {_fmt(h['mean'])} | {_fmt(o.get('mean'))} | "
        f"{_interval(b, 'mean')} | {_fmt(h['var'])} | {_fmt(o.get('var'))} | {_interval(b, 'var')} |"
      )
  return lines + [""]


_SAME = 1e-5  # nats: identical models (HeTLM that kept its init LM) differ by float rounding, not more
_LMS = ("hetlm", *_SINGLES)  # the LMs ranked for "the best LM", as stdout's summary (main.py) ranks them


def _best_lm(report: dict) -> str | None:
  """The LM with the lowest per-user mean held-out NLL: the report's (and stdout's) "best LM"; None if none."""
  models = report["models"]
  nll = {m: models[m]["nll"].get("mean") for m in _LMS if "nll" in models.get(m, {})}
  nll = {m: x for m, x in nll.items() if x is not None and not np.isnan(x)}
  return min(nll, key=nll.get) if nll else None


def _verdict(report: dict) -> list[str]:
  """The line under the title: the best LM, and whether HeTLM beat each single LM in per-user mean NLL (paired
  bootstrap: beat when the whole 95% interval of HeTLM − other is below 0, lost to when above, else tied)."""
  best = _best_lm(report)
  if best is None:
    return []
  note = " (HeTLM kept its warm-start LM: no HeTLM pass beat it)" if report.get("hetlm_is_init_lm") else ""
  line = f"**Verdict:** lowest held-out NLL: {best} ({report['models'][best]['nll']['mean']:.4f} nats/token){note}"
  said = []
  for other in _SINGLES if "hetlm" in report["models"] else ():
    b = (report.get("bootstrap") or {}).get(f"hetlm-{other}", {}).get("nll") or {}
    lo, hi = b.get("mean_ci") or (None, None)
    if other not in report["models"] or lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
      continue
    if hi < -_SAME:
      said.append(f"beat {other}")
    elif lo > _SAME:
      said.append(f"lost to {other}")
    else:  # an interval off 0 by float rounding alone (identical models) is a tie, as in _verdicts
      said.append(f"tied with {other} (95% CI {'includes 0' if lo <= 0 <= hi else f'within {_SAME:g} of 0'})")
  return [line + ("; HeTLM " + ", ".join(said) if said else "") + "." + _as_init(report)]


def _as_init(report: dict) -> str:
  """How many of HeTLM's K clusters are models of their own, when some are the init LM they started from."""
  k, same = report.get("k") or 1, report.get("hetlm_clusters_as_init") or []
  if k < 2 or not same or report.get("hetlm_is_init_lm"):
    return ""
  return (
    f" {k - len(same)} of HeTLM's K={k} clusters differ from its init LM; cluster"
    f"{'s' if len(same) > 1 else ''} {', '.join(map(str, same))} {'are' if len(same) > 1 else 'is'} that LM "
    "(fitted back to it on the validation users)."
  )


def _verdicts(report: dict) -> list[str]:
  """One sentence per comparison that names the winner, as the paired bootstrap sees it: HeTLM against each
  single LM on per-user NLL (mean and variance), and the best LM against the first-order Markov chain."""
  models, boot = report["models"], report.get("bootstrap", {})
  lines = []
  if report.get("hetlm_is_init_lm"):
    lines.append(
      "- HeTLM *is* the single LM it was warm-started from: no HeTLM round beat that LM on the validation "
      "users, so its K models are copies of it. Any difference below is that LM's, not clustering's."
    )
  nll_metric = "nll_no_end" if report.get("protocol") == "new_users" else "nll"
  headline = _HEADLINE_NEW_USERS if report.get("protocol") == "new_users" else _HEADLINE
  for m in [m for m in headline if m in models.get("hetlm", {})]:
    lower_better = m.startswith("nll")
    for other in _SINGLES:
      b = boot.get(f"hetlm-{other}", {}).get(m)
      if not b or b["mean_ci"][0] is None or np.isnan(b["mean_ci"][0]):
        continue
      lo, hi = b["mean_ci"]
      if (hi < -_SAME) if lower_better else (lo > _SAME):
        said = "HeTLM is better"
      elif (lo > _SAME) if lower_better else (hi < -_SAME):
        said = f"`{other}` is better"
      else:
        said = "no detectable difference"
      lo_v, hi_v = b["var_ci"]
      spread = (
        "HeTLM varies less over users"
        if hi_v < -_SAME
        else f"`{other}` varies less over users"
        if lo_v > _SAME
        else "the variances over users tie"
      )
      lines.append(
        f"- `{m}` ({'lower' if lower_better else 'higher'} is better), HeTLM against `{other}`: "
        f"{said} in the mean; {spread}."
      )
  lines += _undefined_or_weak(report)
  if "markov" in models:
    for metric, lower in ((nll_metric, True), ("hr@10", False)):
      lms = [m for m in ("hetlm", "hetlm_mixture", *_SINGLES) if metric in models.get(m, {})]
      if metric not in models["markov"] or not lms:
        continue
      best = (min if lower else max)(lms, key=lambda m: models[m][metric]["mean"])
      lm, mk = models[best][metric]["mean"], models["markov"][metric]["mean"]
      # "The best LM" is the verdict's (lowest per-user mean NLL); any other winner is named by its metric.
      who = (
        "The best LM"
        if metric == "nll" and best == _best_lm(report)
        else f"The LM with the {'lowest' if lower else 'highest'} `{metric}`"
      )
      if (lm < mk) if lower else (lm > mk):
        lines.append(
          f"- {who} (`{best}`) beats the first-order Markov chain in `{metric}` ({_fmt(lm)} against {_fmt(mk)})."
        )
      else:
        lines.append(
          f"- The first-order Markov chain beats every LM in `{metric}` ({_fmt(mk)} against "
          f"`{best}`'s {_fmt(lm)}). {_why_markov_wins(report)}"
        )
  return (["Who wins (paired bootstrap, 95% intervals):", ""] + lines + [""]) if lines else []


def _undefined_or_weak(report: dict) -> list[str]:
  """Why a metric shows "–", and which ranking metrics cannot tell models apart on this catalogue."""
  models, lines = report["models"], []
  pages, negatives = report.get("n_pages"), report.get("negatives", 100)
  sampled = [m for m in ("hr@10_sampled", "ndcg@10_sampled") if any(m in v for v in models.values())]
  undefined = [
    m
    for m in sampled
    if all(v.get(m) is None or v[m].get("mean") is None or np.isnan(v[m]["mean"]) for v in models.values() if m in v)
  ]
  if undefined and pages is not None:
    lines.append(
      f"- {', '.join(f'`{m}`' for m in undefined)}: not defined here (–). They rank the target among "
      f"{negatives} pages the user never visited, and this catalogue has only {pages} pages."
    )
  if pages is not None and pages < 50 and any("hr@10" in v for v in models.values()):
    lines.append(
      f"- Ranking metrics (`hr@10`, `ndcg@10`, `mrr`) can hardly tell models apart here: with {pages} "
      "pages, the top 10 already holds most of the catalogue."
    )
  return lines


def _why_markov_wins(report: dict) -> str:
  stopping = report.get("early_stopping") or {}
  if not stopping.get("patience"):
    return (
      "Training had no early stopping (--patience=0), so the LMs may be undertrained: rerun with "
      "--patience and a larger --epochs."
    )
  return (
    "Every LM trained until its validation NLL stopped improving, so more of the same training did not help "
    "on the validation users: with few users per page, counting transitions is hard to beat; a smaller model, "
    "more --dropout, a longer cycle (--epochs) or more users may close the gap."
  )


def _training(report: dict) -> list[str]:
  """How each model trained: passes over its users and tokens (early stopping decides), seconds, and the
  validation statistic every decision read (per-user mean NLL, with its variance over users)."""
  passes, seconds = report.get("passes") or {}, report.get("train_s") or {}
  tokens, validation = report.get("tokens_trained") or {}, report.get("validation") or {}
  if not passes:
    return []
  stopping = report.get("early_stopping") or {}
  if stopping.get("patience"):
    rule = (
      f"Single LMs trained rounds from scratch of at most {stopping['max_passes_per_round']} passes, "
      f"validated after every pass and stopped after {stopping['patience']} validations without a better "
      "one once half were trained, then an anneal from their kept pass."
    )
    if "warm_passes_per_round" in stopping:
      rule += (
        f" Warm-started models (`hetlm`, `single_ft`) went on from that LM in rounds of at most "
        f"{stopping['warm_passes_per_round']} passes starting at {stopping['warm_lr_scale']}x the learning "
        f"rate, validated every {stopping['val_every']} passes with the same patience"
        + (f", pulled toward it with prox {stopping['prox']}" if stopping.get("prox") else "")
        + (
          f", users routed by the last {stopping['route_frac']} of their history, kept out of training"
          if stopping.get("route_frac")
          else ""
        )
        + "."
      )
    rule += (
      f" Every decision read the per-user mean NLL of the held-out targets of "
      f"{stopping['validation_users']:,} validation users; each round kept its best point, and a model's "
      "rounds ended after one that did not improve on its start."
    )
  else:
    rule = f"Each round trained {stopping.get('max_passes_per_round', '?')} passes (no early stopping)."
  lines = [
    "## Training",
    "",
    rule + " `init_single` is the single LM HeTLM started from.",
    "",
    "| model | passes over its users | tokens trained | train seconds | validation NLL (per-user mean) | "
    "validation variance |",
    "|---|---|---|---|---|---|",
  ]
  for name, n in passes.items():
    v = validation.get(name, {})
    lines.append(f"| {name} | {n} | {tokens[name]:,} | " if name in tokens else f"| {name} | {n} | – | ")
    lines[-1] += (
      f"{seconds[name]:.0f} | " if name in seconds else "– | "
    ) + f"{_fmt(v.get('mean'))} | {_fmt(v.get('var'))} |"
  return lines + [""]


def _save(fig, path: Path) -> None:
  """A figure, written whole or not at all (hetlm_jax/files.py)."""
  with written(path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")


def _figures(workdir: Path, nll: dict[str, np.ndarray], rounds: list[dict], k_sweep: dict | None) -> list[str]:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  names = []
  shown = [m for m in ("single", "single_ft", "single_matched", "hetlm") if m in nll]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
  # Paired per user: the models' CDFs lie on top of each other, their differences do not.
  for m in [m for m in shown if m != "hetlm" and "hetlm" in nll]:
    both = ~np.isnan(nll["hetlm"]) & ~np.isnan(nll[m])
    diff = np.sort(nll["hetlm"][both] - nll[m][both])
    a1.plot(
      np.arange(1, len(diff) + 1) / len(diff),
      diff,
      linewidth=1.5,
      label=f"HeTLM − {m} (mean {diff.mean():+.4f}; HeTLM better for {100 * (diff < 0).mean():.0f}% of users)",
    )
  a1.axhline(0.0, color="black", linewidth=0.8)
  a1.set_xlabel("users, sorted by the difference (fraction)")
  a1.set_ylabel("HeTLM NLL − other NLL (nats/token)")
  a1.set_title("Per-user paired difference (below 0: HeTLM better)")
  if a1.lines[1:]:
    a1.legend(fontsize=8)
  a2.boxplot([nll[m][~np.isnan(nll[m])] for m in shown], showfliers=False)
  a2.set_xticks(range(1, len(shown) + 1), shown)
  a2.set_ylabel("nats/token")
  a2.set_title("Spread over users (whiskers 1.5 IQR)")
  fig.tight_layout()
  _save(fig, workdir / NLL_FIGURE)
  plt.close(fig)
  names.append(NLL_FIGURE)
  hetlm_rounds = rounds  # the reassignment rounds of the evaluated HeTLM
  if hetlm_rounds:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["round"] for r in hetlm_rounds]
    sizes = np.array([r["sizes"] for r in hetlm_rounds])
    bottom = np.zeros(len(x))
    for c in range(sizes.shape[1]):
      a1.bar(x, sizes[:, c], bottom=bottom, label=f"cluster {c}")
      bottom += sizes[:, c]
    a1.set_xlabel("round")
    a1.set_xticks(x)
    a1.set_ylabel("users")
    a1.set_title("Cluster sizes")
    a1.legend(fontsize=7)
    a2.plot(x, [100 * r["moved"] for r in hetlm_rounds], marker="o")
    a2.set_xlabel("round")
    a2.set_xticks(x)
    a2.set_ylim(bottom=0)
    a2.set_ylabel("users moved (%)")
    a2.set_title("Reassignment churn")
    fig.tight_layout()
    _save(fig, workdir / ROUNDS_FIGURE)
    plt.close(fig)
    names.append(ROUNDS_FIGURE)
  if k_sweep:
    ks = sorted(int(k) for k in k_sweep)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [k_sweep[str(k)] for k in ks], marker="o")
    ax.set_xlabel("K")
    ax.set_ylabel("selection NLL (nats/token)")
    ax.set_title("Held-out NLL vs K")
    fig.tight_layout()
    _save(fig, workdir / K_FIGURE)
    plt.close(fig)
    names.append(K_FIGURE)
  return names


def write_report(workdir: Path, report: dict, nll: dict[str, np.ndarray], rounds: list[dict]) -> None:
  """report.md (and its figures) beside eval.json: the headline, the verdicts, the intervals, the training, the
  clusters and outcomes."""
  models = [m for m in _ORDER if m in report["models"]]
  lines = ["# HeTLM evaluation", "", *_verdict(report), "", _intro(report), ""] + _headline(report) + _verdicts(report)
  lines += _llm_claim(report) + _every_model(report, models) + _other_comparisons(report) + [""]
  lines += _training(report)[:-1]
  lines += _clusters_and_outcomes(report)
  figures = _figures(workdir, nll, rounds, (report.get("k_sweep") or {}).get("selection_nll"))
  if figures:
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
  else:
    lines += [
      "",
      "(Figures need matplotlib: `pip install matplotlib`, or `pip install -e '.[plots]'` in the repository.)",
    ]
  replace_text(workdir / REPORT_FILE, "\n".join(lines) + "\n")


_LLM_METRICS = (("nll", True), ("catalogue_nll", True), ("hr@10", False), ("ndcg@10", False))


def _llm_claim(report: dict) -> list[str]:
  """Claim (i): the best page LM against each LLM baseline, per metric, with the paired-bootstrap intervals, and
  what the LLM is (parameters, training tokens and seconds, context in subwords)."""
  llms = report.get("llm") or {}
  best = _best_lm(report)
  if not llms or best is None:
    return []
  lines = ["## Claim (i): a page-level LM against a subword LLM", ""]
  for name, r in llms.items():
    vs = r.get("vs", {}).get(best, {})
    said = []
    for metric, lower in _LLM_METRICS:
      b = vs.get(metric)
      if not b or b["mean_ci"][0] is None or np.isnan(b["mean_ci"][0]):
        continue
      lo, hi = b["mean_ci"]
      wins = (hi < -_SAME) if lower else (lo > _SAME)
      loses = (lo > _SAME) if lower else (hi < -_SAME)
      who = f"`{best}` is better" if wins else f"`{name}` is better" if loses else "no detectable difference"
      said.append(f"`{metric}` {who} (Δ {_interval(b, 'mean')})")
    context = r.get("context_subwords") or {}
    lines.append(
      f"- The best page LM (`{best}`) against `{name}` ({r.get('model')}, {r.get('finetune')}; "
      f"{r.get('params', 0):,} parameters, {r.get('trained_params', 0):,} trained on "
      f"{r.get('tokens_trained', 0):,} subword tokens in {r.get('train_s', 0.0):.0f} s; "
      f"{r.get('context_pages', '?')} pages of context, {context.get('mean', float('nan')):.1f} subwords on "
      f"average): " + ("; ".join(said) if said else "no comparable users") + "."
    )
  lines += [
    "",
    "Δ = page LM − LLM over the same users, with paired-bootstrap 95% intervals. `nll`: nats per target token, the "
    "LLM's log p of a page the sum of its subwords' (pages as text, each tokenized alone); `catalogue_nll`, "
    "`hr@10`, `ndcg@10`: the first next page among every page of the catalogue, on the LLM's ranked draw of "
    f"users ({', '.join(str(r.get('ranked_users', '?')) for r in llms.values())}); in the tables below the LLM's "
    "ranking columns are means over that draw alone, the other models' over every user. Every page LM against "
    "each LLM: eval.json's `llm`.",
    "",
  ]
  return lines


def _intro(report: dict) -> str:
  """What was scored, and how, for the protocol of the run."""
  if report.get("protocol") == "new_users":
    return (
      f"{report['n_users']:,} new users, never trained on (the split by user); each user's whole sequence "
      "is scored. HeTLM and the Markov mixture score it with their mixture likelihood (π = cluster shares), "
      "as a new user has no history to route by. `nll`: nats per token with the end marker; `nll_no_end`: "
      "nats per page token, each page given that the sequence goes on. Next-page metrics rank each user's "
      f"last page given the pages before it ({report['ranked_users']:,} users with at least two pages)."
      + _unknown_note(report)
    )
  return (
    f"{report['n_users']:,} users; each user's held-out target is scored given their history, and each "
    "user's cluster is chosen from the history alone. NLL is in nats per target token (lower is better); "
    "next-page metrics rank the target's first page among all pages, and `_sampled` among 100 random "
    "pages the user never visited (SASRec's protocol)." + _unknown_note(report)
  )


def _every_model(report: dict, models: list[str]) -> list[str]:
  """The pooled bits (split by user), every metric of every model side by side, and the NLL percentiles."""
  lines = []
  if report.get("bits_per_token"):
    lines += [
      "Pooled over all test tokens, in bits per token (lower is better):",
      "",
      "| model | no end marker | with end marker |",
      "|---|---|---|",
    ]
    for name in models:
      b = report["bits_per_token"].get(name, {})
      lines.append(f"| {name} | {_fmt(b.get('no_end'))} | {_fmt(b.get('with_end'))} |")
    lines.append("")
  metrics = [m for m in _METRICS if any(m in report["models"][name] for name in models)]
  lines += ["Every model side by side. Cells: mean (std over users).", ""]
  lines.append("| model | " + " | ".join(metrics) + " |")
  lines.append("|---" * (len(metrics) + 1) + "|")
  for name in models:
    cells = []
    for metric in metrics:
      s = report["models"][name].get(metric)
      cells.append(f"{_fmt(s['mean'])} ({_fmt(s['std'])})" if s else "–")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Per-user NLL percentiles (p10 / p50 / p90):", ""]
  for name in models:
    s = report["models"][name]["nll"]
    lines.append(f"- {name}: {_fmt(s['p10'])} / {_fmt(s['p50'])} / {_fmt(s['p90'])}, variance {_fmt(s['var'])}")
  return lines


def _other_comparisons(report: dict) -> list[str]:
  """The paired comparisons the headline table does not show."""
  headline = set(_HEADLINE_NEW_USERS if report.get("protocol") == "new_users" else _HEADLINE)
  rest = {
    c: {m: b for m, b in by_metric.items() if not (c in {f"hetlm-{o}" for o in _SINGLES} and m in headline)}
    for c, by_metric in report.get("bootstrap", {}).items()
  }
  if not any(rest.values()):  # the headline table already shows HeTLM − single LMs on its metrics
    return []
  lines = [
    "",
    "## Other paired comparisons (paired bootstrap, 95% intervals)",
    "",
    "| comparison | metric | mean diff | 95% CI | variance diff | 95% CI |",
    "|---|---|---|---|---|---|",
  ]
  for comparison, by_metric in rest.items():
    for metric, b in by_metric.items():
      lines.append(
        f"| {comparison} | {metric} | {_fmt(b['mean_diff'])} | [{_fmt(b['mean_ci'][0])}, "
        f"{_fmt(b['mean_ci'][1])}] | {_fmt(b['var_diff'])} | [{_fmt(b['var_ci'][0])}, "
        f"{_fmt(b['var_ci'][1])}] |"
      )
  return lines + [
    "",
    "For NLL a negative difference favours HeTLM (lower mean, lower variance); for HR/NDCG and the "
    "session alignment (edit similarity, Jaccard, ROUGE-L F1) a positive mean difference does.",
  ]


def _clusters_and_outcomes(report: dict) -> list[str]:
  """The per-cluster table, and the outcome predictions (a log with outcome events)."""
  lines = []
  if report.get("clusters"):
    cols = [c for c in ("hetlm_nll", "single_nll", "single_matched_nll") if c in report["clusters"][0]]
    lines += [
      "",
      "## Per cluster (mean NLL of the cluster's users)",
      "",
      "| cluster | users | " + " | ".join(cols) + " |",
      "|---" * (len(cols) + 2) + "|",
    ]
    for row in report["clusters"]:
      lines.append(f"| {row['cluster']} | {row['users']:,} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
  if report.get("outcomes"):
    lines += [
      "",
      "## Outcomes (will the next session contain it?)",
      "",
      "| model | outcome | AUC | F1 | positives / users |",
      "|---|---|---|---|---|",
    ]
    for name, by_outcome in report["outcomes"].items():
      for outcome, o in by_outcome.items():
        lines.append(f"| {name} | {outcome} | {_fmt(o['auc'])} | {_fmt(o['f1'])} | {o['positives']} / {o['users']} |")
  return lines
