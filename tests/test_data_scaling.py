"""scripts/data_scaling.py on a tiny slice of the packaged msnbc sample: two training sizes, one test set."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from hetlm_jax.bench.flops import model_flops_per_token
from hetlm_jax.workdir import built_config

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from data_scaling import Cell  # noqa: E402

TINY = [
  "--max_users=1000",
  "--context=16",
  "--n_layers=1",
  "--n_heads=2",
  "--epochs=1",
  "--init_rounds=1",
  "--warm_epochs=1",
  "--rounds=1",
  "--batch_size=32",
  "--dropout=0",
  "--eval_batch_size=256",
]


def test_the_curve_is_written_for_every_size_on_one_test_set(tmp_path):
  out, png = tmp_path / "scaling", tmp_path / "curve.png"
  sample = ROOT / "hetlm_jax/data/samples/msnbc_sample.seq.gz"
  done = subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts/data_scaling.py"),
      f"--data={sample}",
      f"--out={out}",
      "--sizes=100,400",
      "--k=2",
      "--d_model=16",
      "--test_users=200",
      "--test_offset=200",
      f"--plot={png}",
      "--",
      *TINY,
    ],
    capture_output=True,
    text=True,
    cwd=tmp_path,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  rows = json.loads((out / "data_scaling.json").read_text())
  assert [r["train_users"] for r in rows] == [100, 400] and rows[0]["train_tokens"] < rows[1]["train_tokens"]
  assert {r["setting"] for r in rows} == {"K=2, all, d_model 16"} and "| 400 |" in done.stdout
  for r in rows:
    workdir = out / Cell.parse(r["run"]).name
    report = json.loads((workdir / "eval.json").read_text())
    # One test set: the same 200 users (split_order's offset; tests/test_new_users.py) score every model.
    assert r["test_users"] == report["n_users"] == 200 and report["protocol"] == "new_users"
    models = report["models"]
    for other in ("single", "single_matched"):
      d = r["vs"][other]
      # The intervals are eval.json's paired bootstrap over those users: the mean of the per-user differences
      # is the difference of the two models' means, and each interval holds its estimate.
      assert d == {
        k: report["bootstrap"][f"hetlm-{other}"]["nll_no_end"][k]
        for k in ("mean_diff", "mean_ci", "var_diff", "var_ci")
      }
      np.testing.assert_allclose(
        d["mean_diff"], models["hetlm"]["nll_no_end"]["mean"] - models[other]["nll_no_end"]["mean"], atol=1e-9
      )
      assert d["mean_ci"][0] <= d["mean_diff"] <= d["mean_ci"][1] and d["var_ci"][0] <= d["var_diff"] <= d["var_ci"][1]
    assert r["bits_per_page_token"] == {m: b["no_end"] for m, b in report["bits_per_token"].items()}
    # Compute: HeTLM's tokens and FLOPs include the init LM it goes on from; single's are the init LM's own.
    tokens = report["tokens_trained"]
    assert r["compute"]["hetlm"]["tokens"] == tokens["hetlm"] + tokens["init_single"]
    assert r["compute"]["single"]["tokens"] == tokens["single"]
    per_token = model_flops_per_token(built_config(workdir).model)
    np.testing.assert_allclose(r["compute"]["hetlm"]["flops"], r["compute"]["hetlm"]["tokens"] * per_token)
    assert r["compute"]["single_matched"]["flops"] > tokens["single_matched"] * per_token  # a wider model
