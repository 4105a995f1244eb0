#!/usr/bin/env bash
# What the speed buys: the 5-minute demo before (REV, default the last commit before the speed work) and
# after (this checkout), on the same machine, one after the other: training steps in the budget, then
# class accuracy and Inception FID of 1,000 samples (DDIM 50, w = 3, EMA) against 1,000 held-out digits,
# with the real-vs-real floor (1,000 training digits against the same reference).
#   bash benchmarks/demo_quality.sh [REV]     # ~30 minutes on 2 cores; writes runs/demo-quality/summary.md
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-e921f36}
OUT=${OUT:-runs/demo-quality}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
rm -rf "$OUT/before-src" "$OUT/before" "$OUT/after"
mkdir -p "$OUT/before-src" && git archive "$REV" src | tar -x -C "$OUT/before-src"
PYTHONPATH="$OUT/before-src/src" $PY -m difflo demo --out "$OUT/before" > "$OUT/before.log" 2>&1
$PY -m difflo demo --out "$OUT/after" > "$OUT/after.log" 2>&1
$PY -m difflo eval train-classifier --data mnist10k > "$OUT/classifier.log" 2>&1 || true   # once per machine (cached)
$PY -m difflo eval fid-ref --data mnist10k --split test --n 1000 --out "$OUT/ref.npz"
$PY - "$OUT/train-1000.npz" <<'PY'
import sys, numpy as np
from difflo import data
ds = data.load("mnist10k", "train")
idx = np.random.default_rng(0).permutation(len(ds))[:1000]
np.savez(sys.argv[1], images=ds.images[idx], labels=ds.labels[idx])
PY
$PY -m difflo eval fid --samples "$OUT/train-1000.npz" --ref "$OUT/ref.npz" | tee "$OUT/floor.txt"
for x in before after; do
  $PY -m difflo eval model --ckpt "$OUT/$x/run" --n 1000 --ref "$OUT/ref.npz" --json "$OUT/$x.json"
done
$PY - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, re, sys, pathlib
out = pathlib.Path(sys.argv[1])
floor = re.search(r"FID[^0-9]*([0-9.]+)", (out / "floor.txt").read_text())
rows = []
for x in ("before", "after"):
    steps = max(int(p.name.split("_")[1]) for p in (out / x / "run" / "checkpoints").glob("step_*"))
    r = json.loads((out / f"{x}.json").read_text())
    rows.append(f"| {x} | {steps} | {r.get('class_accuracy', float('nan')):.3f} | {r.get('fid', float('nan')):.1f} |")
print("| demo | steps in 5 min | class accuracy (N=1000) | Inception FID (N=1000 vs 1000) |\n|---|---|---|---|")
print("\n".join(rows))
print(f"\nreal-vs-real floor (1,000 training digits vs the same reference): FID {floor.group(1) if floor else '?'}")
PY
