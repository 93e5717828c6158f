#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md in one run, for an accelerator lent for a few minutes:
#   OUT=gpu_out bash launch/gpu_bench.sh        (from the repository root; the device tool sets $OUT)
# 1. hetlm bench at the main job's shapes (K=8) plus the size sweep (d_model 64, 256, 512, 1024 x K 1, 4, 8, 16):
#    stacked step, loop, PyTorch (eager loop and torch.func), MFU against the chip's bf16 peak, scoring, padding.
# 2. Compile time: the stacked step unrolled and vmapped, the loop's step, K 1, 8, 16 x vocabulary 64, 2000, 20000.
# 3. The main job's wall time (hetlm train on the packaged sample) and its eval.json, then again with the
#    compilation cache the first run filled.
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
python -m hetlm_jax bench --bench_steps=3 --batch_size=16 --nobench_torch --sweep=compile --out="$OUT/compile.json" \
  > "$OUT/compile.log" 2>&1
echo "compile bench exit $?" >> "$OUT/status.txt"
export HETLM_COMPILATION_CACHE=/tmp/hetlm_jax_cache
rm -rf "$HETLM_COMPILATION_CACHE"
for run in cold cached; do
  start=$(date +%s)
  python -m hetlm_jax train --workdir=/tmp/hetlm_mainjob_$run > "$OUT/mainjob_$run.log" 2>&1
  echo "mainjob ($run cache) exit $? seconds $(( $(date +%s) - start ))" >> "$OUT/status.txt"
done
cp /tmp/hetlm_mainjob_cold/eval.json /tmp/hetlm_mainjob_cold/report.md "$OUT/" 2>/dev/null
tail -3 "$OUT/bench.log" "$OUT/status.txt"
