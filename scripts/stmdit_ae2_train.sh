#!/usr/bin/env bash
# Background training of the v2 tile autoencoder (issue 15), CPU-friendly (1 thread, nice 19).
# Usage: scripts/stmdit_ae2_train.sh [OUT_DIR]   (resumes from OUT_DIR/ae2.safetensors.state)
# The same command runs on CUDA (bf16) when a GPU is present.
set -euo pipefail
OUT=${1:-/work/scratch/stmdit/ae2}
DATA=${STGEN_HER2ST:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/her2st}
mkdir -p "$OUT"
RESUME=()
[ -f "$OUT/ae2.safetensors.state" ] && RESUME=(--resume "$OUT/ae2.safetensors.state")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec nice -n 19 python -m napari_stgen.cli.main train stmdit-ae --data "$DATA" \
  --out "$OUT/ae2.safetensors" --steps 12000 --batch 8 --crop-px 64 --disc-start 2500 \
  --holdout C3 --seed 0 --threads 1 --save-every-s 240 --cache "${STGEN_CACHE_STMDIT:-/work/scratch/stmdit/cache}" \
  "${RESUME[@]}"
