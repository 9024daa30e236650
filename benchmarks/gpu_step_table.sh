#!/usr/bin/env bash
# The GPU measurements of issue 13 in one run (a few minutes on an H100 / H200): launched ops and host
# syncs per step on the GPU, then the step-time tables with and without PRETRAIN.COMPILE (batch 2 at
# 800x1216 and 1 x 800x1216 for 2DRCL / Mask R-CNN, batch 32 for MoCo v2 / DetCo).
# Usage: bash benchmarks/gpu_step_table.sh   (results in benchmarks/results, tables in BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY benchmarks/bench_step_ops.py --device cuda
for compiled in "" "--compile"; do
  $PY benchmarks/bench_pretrain_step.py --device cuda --no-breakdown --no-flops $compiled
  $PY benchmarks/bench_pretrain_step.py --device cuda --no-flops --batch 32 --kinds moco,detco $compiled
  $PY benchmarks/bench_pretrain_step.py --device cuda --no-flops --batch 1 --kinds maskrcnn,drcl --no-breakdown $compiled
done
