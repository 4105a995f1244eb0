#!/usr/bin/env bash
# The colour model's numbers for the README: a named-row grid, class accuracy (subcategory and 9-way
# category), Inception FID of N class-balanced samples against the held-out emoji split (at SIZE x SIZE,
# default 32; SIZE=64 for configs/emoji64-cpu.yaml; accuracy from the classifier at that size),
# the real-vs-real floor at the same N (N training images against the same reference), and the
# nearest-neighbour memorisation check on the scarce classes.
#   bash benchmarks/emoji_quality.sh [RUN]       # default runs/emoji32; ~15 minutes on 2 cores
#   SIZE=64 OUT=runs/emoji64-eval bash benchmarks/emoji_quality.sh runs/emoji64-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/emoji32}; OUT=${OUT:-runs/emoji-eval}; PY=${PYTHON:-.venv/bin/python}; N=${N:-490}; SIZE=${SIZE:-32}
mkdir -p "$OUT"
$PY -m difflo sample --ckpt "$RUN" --grid 8 --out "$OUT/grid.png" \
  --classes "$($PY -c 'from difflo.data import emoji; print(",".join(emoji.SHOWN_SUBCATEGORIES))')"
[ -f "$OUT/ref.npz" ] || $PY -m difflo eval fid-ref --data emoji --image-size "$SIZE" --split test --out "$OUT/ref.npz"
$PY - "$OUT/train-$N.npz" "$N" "$SIZE" <<'PY'
import sys, numpy as np
from difflo import data
ds = data.load("emoji", "train", image_size=int(sys.argv[3]))
idx = np.random.default_rng(0).permutation(len(ds))[:int(sys.argv[2])]
np.savez(sys.argv[1], images=ds.images[idx], labels=ds.labels[idx])
PY
$PY -m difflo eval fid --samples "$OUT/train-$N.npz" --ref "$OUT/ref.npz" | tee "$OUT/floor.txt"
$PY -m difflo eval model --ckpt "$RUN" --n "$N" --ref "$OUT/ref.npz" --json "$OUT/model.json" | tee "$OUT/model.txt"
$PY -m difflo eval nearest --ckpt "$RUN" --json "$OUT/nearest.json" --out "$OUT/nearest.png" | tee "$OUT/nearest.txt"
