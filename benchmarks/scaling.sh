#!/usr/bin/env bash
# Step time and peak memory of 2DRCL and the stock Mask R-CNN as batch size and image size grow
# (3 points each). Usage: bash benchmarks/scaling.sh [cpu|cuda]; then python benchmarks/scaling_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
PY=${PY:-python3}
if [ "$DEVICE" = cuda ]; then SIZES="512x768 800x1216 1024x1536"; BATCHES="1 2 4"; BASE="800x1216"; else SIZES="256x384 384x512 512x768"; BATCHES="1 2 4"; BASE="384x512"; fi
for b in $BATCHES; do
  $PY benchmarks/bench_pretrain_step.py --device "$DEVICE" --kinds maskrcnn,drcl --no-breakdown --no-flops \
      --batch "$b" --height "${BASE%x*}" --width "${BASE#*x}"
done
for hw in $SIZES; do
  $PY benchmarks/bench_pretrain_step.py --device "$DEVICE" --kinds maskrcnn,drcl --no-breakdown --no-flops \
      --batch 2 --height "${hw%x*}" --width "${hw#*x}"
done
