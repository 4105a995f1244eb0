#!/usr/bin/env bash
# Re-choosing the demo's defaults for FID as well as accuracy: each candidate trains for the same number
# of steps the 5-minute demo reaches on the measuring machine (STEPS, default 700: fixed steps make the
# comparison independent of other load), then class accuracy and Inception FID of N samples (DDIM 50 or
# the flow's Euler 50, guidance W) against the 1,000 held-out digits of benchmarks/demo_quality.sh.
#   bash benchmarks/demo_defaults.sh      # ~8 minutes a candidate on 2 cores; runs/demo-defaults/summary.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo-defaults}; PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-700}; N=${N:-500}; W=${W:-2}
REF=${REF:-runs/demo-quality/ref.npz}
mkdir -p "$OUT"
[ -f "$REF" ] || $PY -m difflo eval fid-ref --data mnist10k --split test --n 1000 --out "$REF"
common="train.steps=$STEPS train.ckpt_every=$STEPS train.sample_every=0 train.precision=fp32"
trial() {   # name, config, overrides...
  local name=$1 config=$2; shift 2
  [ -f "$OUT/$name.json" ] && return 0
  rm -rf "$OUT/$name"
  $PY -m difflo train --config "$config" --out "$OUT/$name" $common "$@" > "$OUT/$name.log" 2>&1
  $PY -m difflo eval model --ckpt "$OUT/$name" --n "$N" --w "$W" --steps 50 --ref "$REF" --json "$OUT/$name.json" >> "$OUT/$name.log" 2>&1
}
sampler() {   # name, trained candidate, sampler: the same weights under another sampler
  local name=$1 run=$2 s=$3
  [ -f "$OUT/$name.json" ] && return 0
  $PY -m difflo eval model --ckpt "$OUT/$run" --n "$N" --w "$W" --sampler "$s" --steps 50 --ref "$REF" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
}
trial base      configs/mnist10k.yaml
trial cosine    configs/mnist10k.yaml train.lr_schedule=cosine
trial flow      configs/mnist10k-flow.yaml
sampler base-ddpm base ddpm
$PY - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| candidate | class accuracy | Inception FID |\n|---|---|---|")
for p in sorted(out.glob("*.json")):
    r = json.loads(p.read_text())
    print(f"| {p.stem} | {r['class_accuracy']:.3f} | {r['fid']:.1f} |")
PY
