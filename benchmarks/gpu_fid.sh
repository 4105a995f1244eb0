#!/usr/bin/env bash
# After benchmarks/gpu.sh's emoji64 section, on a machine with the emoji files and the Inception weights (the
# GPU machine has neither network nor weights): Inception FID at 64x64 of the run's class-balanced samples
# against the held-out emoji split, and the real-vs-real floor at the same N (N training images against the
# same reference), as benchmarks/emoji_quality.sh does at 32x32.
#   bash benchmarks/gpu_fid.sh GPU_OUT      # GPU_OUT: the folder the device run wrote (its files_at); ~3 minutes
# Writes OUT (default runs/emoji64-gpu-eval): ref.npz (reused), train-N.npz, floor.txt, fid.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_OUT=${1:?usage: bash benchmarks/gpu_fid.sh GPU_OUT (the folder holding samples.npz from benchmarks/gpu.sh)}
OUT=${OUT:-runs/emoji64-gpu-eval}; PY=${PYTHON:-.venv/bin/python}
if [ ! -f "$GPU_OUT/samples.npz" ]; then
  echo "gpu_fid.sh: $GPU_OUT/samples.npz not found; run benchmarks/gpu.sh's emoji64 section on a GPU first" >&2
  exit 2
fi
mkdir -p "$OUT"
N=$($PY -c "import numpy as np, sys; print(len(np.load(sys.argv[1])['labels']))" "$GPU_OUT/samples.npz")
[ -f "$OUT/ref.npz" ] || $PY -m difflo eval fid-ref --data emoji --image-size 64 --split test --out "$OUT/ref.npz"
$PY - "$OUT/train-$N.npz" "$N" <<'PY'
import sys, numpy as np
from difflo import data
ds = data.load("emoji", "train", image_size=64)
idx = np.random.default_rng(0).permutation(len(ds))[:int(sys.argv[2])]
np.savez(sys.argv[1], images=ds.images[idx], labels=ds.labels[idx])
PY
echo "real-vs-real floor (N=$N training images):" | tee "$OUT/floor.txt"
$PY -m difflo eval fid --samples "$OUT/train-$N.npz" --ref "$OUT/ref.npz" | tee -a "$OUT/floor.txt"
echo "emoji64 samples from $GPU_OUT (N=$N):" | tee "$OUT/fid.txt"
$PY -m difflo eval fid --samples "$GPU_OUT/samples.npz" --ref "$OUT/ref.npz" | tee -a "$OUT/fid.txt"
