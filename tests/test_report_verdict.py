"""report.md opens with one verdict line: the LM with the lowest per-user mean NLL, and whether HeTLM beat each single
LM as the paired bootstrap sees it; every "best LM" below names that same LM."""

import re

import pytest

from hetlm_jax.eval.report import write_report

_BEAT, _LOST, _TIED = (-0.05, -0.02), (0.01, 0.03), (-0.01, 0.02)  # 95% CIs of HeTLM − other in nll


def _summary(mean):
  return {"mean": mean, "std": 0.5, "var": 0.25, "p10": mean - 0.6, "p50": mean, "p90": mean + 0.6}


def _boot(lo, hi):
  return {"mean_diff": (lo + hi) / 2, "mean_ci": [lo, hi], "var_diff": 0.0, "var_ci": [-0.1, 0.1]}


def _report(cis, nll=None, hr=None, **extra):
  """Four LMs and Markov: single_ft has the lowest nll and hetlm the highest hr@10 unless told otherwise."""
  nll = nll or {"hetlm": 1.30, "single": 1.31, "single_ft": 1.2345, "single_matched": 1.35, "markov": 1.60}
  hr = hr or {"hetlm": 0.80, "single": 0.70, "single_ft": 0.75, "single_matched": 0.72, "markov": 0.60}
  models = {m: {"nll": _summary(nll[m]), "hr@10": _summary(hr[m])} for m in nll}
  return {
    "models": models,
    "n_users": 50,
    "n_pages": 17,
    "bootstrap": {f"hetlm-{o}": {"nll": _boot(*ci), "hr@10": _boot(0.01, 0.02)} for o, ci in cis.items()},
    **extra,
  }


def _write(tmp_path, report):
  write_report(tmp_path, report, {}, [])
  return [line for line in (tmp_path / "report.md").read_text().splitlines() if line]  # blank lines aside


def test_verdict_is_the_line_under_the_title_and_follows_the_interval(tmp_path):
  lines = _write(tmp_path, _report({"single": _TIED, "single_ft": _LOST, "single_matched": _BEAT}))
  assert lines[0] == "# HeTLM evaluation"
  assert lines[1] == (
    "**Verdict:** lowest held-out NLL: single_ft (1.2345 nats/token); HeTLM tied with single "
    "(95% CI includes 0), lost to single_ft, beat single_matched."
  )
  assert sum(line.startswith("**Verdict:**") for line in lines) == 1


@pytest.mark.parametrize("order", [(_BEAT, _LOST, _TIED), (_LOST, _TIED, _BEAT), (_TIED, _BEAT, _LOST)])
def test_each_single_lm_gets_the_word_its_own_interval_says(tmp_path, order):
  cis = dict(zip(("single", "single_ft", "single_matched"), order))
  verdict = _write(tmp_path, _report(cis))[1]
  word = {_BEAT: "beat {}", _LOST: "lost to {}", _TIED: "tied with {} (95% CI includes 0)"}
  said = verdict.split("; HeTLM ", 1)[1].rstrip(".").split(", ")
  assert said == [word[ci].format(other) for other, ci in cis.items()]
  # Swapping the sign of every interval swaps beat and lost; a tie stays a tie.
  flipped = {o: (-hi, -lo) for o, (lo, hi) in cis.items()}
  verdict = _write(tmp_path, _report(flipped))[1]
  word = {_BEAT: "lost to {}", _LOST: "beat {}", _TIED: "tied with {} (95% CI includes 0)"}
  assert verdict.split("; HeTLM ", 1)[1].rstrip(".").split(", ") == [word[ci].format(o) for o, ci in cis.items()]


def test_an_interval_off_zero_by_float_rounding_is_a_tie(tmp_path):
  verdict = _write(tmp_path, _report({"single": (-2e-7, -1e-7)}, hetlm_is_init_lm=True))[1]
  assert verdict == (
    "**Verdict:** lowest held-out NLL: single_ft (1.2345 nats/token) (HeTLM kept its warm-start LM: "
    "no HeTLM pass beat it); HeTLM tied with single (95% CI within 1e-05 of 0)."
  )


def test_every_best_lm_is_the_verdicts_best_lm(tmp_path):
  """single_ft has the lowest NLL, hetlm the highest hr@10: no sentence may call hetlm "the best LM"."""
  lines = _write(tmp_path, _report({"single": _TIED, "single_ft": _LOST, "single_matched": _BEAT}))
  best = re.match(r"\*\*Verdict:\*\* lowest held-out NLL: (\w+) ", lines[1]).group(1)
  assert best == "single_ft"
  named = [m for line in lines for m in re.findall(r"best LM \(`(\w+)`", line)]
  assert named and set(named) == {best}
  text = "\n".join(lines)
  assert "- The best LM (`single_ft`) beats the first-order Markov chain in `nll` (1.2345 against 1.6000)." in text
  assert "- The LM with the highest `hr@10` (`hetlm`) beats the first-order Markov chain in `hr@10`" in text
  assert "can hardly tell models apart" in text


def test_without_hetlm_or_bootstrap_the_verdict_names_only_the_best_lm(tmp_path):
  report = _report({})
  del report["models"]["hetlm"]
  assert _write(tmp_path, report)[1] == "**Verdict:** lowest held-out NLL: single_ft (1.2345 nats/token)."
  report = _report(
    {"single": _BEAT}, nll={"hetlm": 1.1, "single": 1.3, "single_ft": 1.4, "single_matched": 1.5, "markov": 1.6}
  )
  del report["bootstrap"]
  assert _write(tmp_path, report)[1] == "**Verdict:** lowest held-out NLL: hetlm (1.1000 nats/token)."


def test_the_intro_says_how_many_ranked_pages_no_model_knows(tmp_path):
  said = "7 of these users' ranked page never appeared in training"
  assert any(said in line for line in _write(tmp_path, _report({"single": _TIED}, unknown_targets=7)))
  assert not any(
    "never appeared in training" in line for line in _write(tmp_path, _report({"single": _TIED}, unknown_targets=0))
  )
