#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md in one run, for an accelerator lent for a few minutes:
#   OUT=gpu_out bash launch/gpu_bench.sh        (from the repository root; the device tool sets $OUT)
# 1. hetlm bench at the main job's shapes (K=8) plus the size sweep (d_model 64, 256, 512, 1024 x K 1, 4, 8, 16):
#    stacked step, loop, PyTorch (eager loop and torch.func), MFU against the chip's bf16 peak, scoring, padding.
# 2. The main job's wall time (hetlm train on the packaged sample) and its eval.json.
# Each part writes its files as soon as it ends, so a run cut short still returns what it measured.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
STEPS=${STEPS:-10}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import jax; print(jax.__version__, jax.devices())"; } \
  > "$OUT/device.txt" 2>&1
python -m hetlm_jax bench --bench_steps="$STEPS" --sweep="${SWEEP:-full}" --out="$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/status.txt"
start=$(date +%s)
python -m hetlm_jax train --workdir=/tmp/hetlm_mainjob > "$OUT/mainjob.log" 2>&1
echo "mainjob exit $? seconds $(( $(date +%s) - start ))" >> "$OUT/status.txt"
cp /tmp/hetlm_mainjob/eval.json /tmp/hetlm_mainjob/report.md "$OUT/" 2>/dev/null
tail -3 "$OUT/bench.log" "$OUT/status.txt"
