#!/usr/bin/env bash
# Students at 4, 2 and 1 network calls per image, each against its teacher at the same N and seeds (Inception FID vs
# the held-out mnist10k test split, the real-vs-real floor at the same N, class accuracy, KID, precision/recall):
#   bash benchmarks/distill_steps.sh [TEACHER] [OUT]      # TEACHER: a diffusion run or demo (default); ~50 min on 2 cores
# progressive: TEACHER -> a 4-step student (3 rounds from 32 DDIM steps) -> its 2-step student -> its 1-step
#   student (a student of a student keeps halving), ROUND_STEPS student steps a round (default 130, lr 1e-3: the
#   demo's measured setting, README "Few-step students"); the teacher is also scored with its default sampler and
#   with DDIM at 1 and 2 guided steps (2 and 4 calls; DPM-Solver++(2M) gives the same images at these steps).
# reflow (PART=reflow or all): a flow teacher trained FLOW_STEPS steps of configs/mnist10k-flow.yaml, its reflow
#   student (PAIRS teacher pairs from Heun 20, REFLOW_STEPS student steps), both scored with 1, 2 and 4 Euler steps
#   (the teacher guided at its w: 2 calls a step; the student at w = 1) and the teacher with its default sampler.
# Every distillation and training prints its wall and CPU seconds (OUT/*.time); the reflow family's eval JSONs are in
# OUT/flow-evals. Tables and plots: python benchmarks/distill_plot.py OUT --floor F --teacher TEACHER [--out PNG], and
# the same with OUT/flow-evals and --teacher OUT/flow.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${1:-demo}; OUT=${2:-runs/distill-steps}; PART=${PART:-all}
PY=${PYTHON:-.venv/bin/python}; N=${N:-1000}
ROUND_STEPS=${ROUND_STEPS:-130}; LR=${LR:-1e-3}
FLOW_STEPS=${FLOW_STEPS:-400}; PAIRS=${PAIRS:-1024}; REFLOW_STEPS=${REFLOW_STEPS:-400}
mkdir -p "$OUT"
REF=${REF:-$OUT/ref.npz}
[ -f "$REF" ] || $PY -m difflo eval fid-ref --data mnist10k --split test --out "$REF"
if [ ! -f "$OUT/floor.txt" ]; then
  $PY - "$OUT/train-$N.npz" "$N" <<'PY'
import sys, numpy as np
from difflo import data
ds = data.load("mnist10k", "train")
idx = np.random.default_rng(0).permutation(len(ds))[:int(sys.argv[2])]
np.savez(sys.argv[1], images=ds.images[idx], labels=ds.labels[idx])
PY
  $PY -m difflo eval fid --samples "$OUT/train-$N.npz" --ref "$REF" | tee "$OUT/floor.txt"
fi
$PY -c 'from difflo.eval.classifier import default_classifier_path as p; import sys; sys.exit(not p("mnist10k").is_file())' ||
  $PY -m difflo eval train-classifier --data mnist10k          # class accuracy's classifier, once
timed() { name=$1; shift; /usr/bin/time -f "$name: wall %e s, user+sys %U+%S s" -o "$OUT/$name.time" "$@" 2>&1 | tail -2
          cat "$OUT/$name.time"; }
EVALS=$OUT                                     # the eval JSONs of one teacher's family (benchmarks/distill_plot.py)
ev() { name=$1; shift; [ -f "$EVALS/$name.json" ] && { cat "$EVALS/$name.txt"; return; }
       $PY -m difflo eval model --n "$N" --ref "$REF" --json "$EVALS/$name.json" "$@" | tee "$EVALS/$name.txt"; }
resume() { [ -d "$1" ] && echo --resume || true; }
finished() { grep -q "wall" "$OUT/$1.time" 2>/dev/null && ! grep -q "non-zero" "$OUT/$1.time"; }   # completed earlier

if [ "$PART" = all ] || [ "$PART" = progressive ]; then
  prev=$TEACHER
  for spec in "student4:--teacher-steps 32 --rounds 3" "student2:--rounds 1" "student1:--rounds 1"; do
    name=${spec%%:*}; dir="$OUT/$name"
    finished "$name" || timed "$name" $PY -m difflo distill --ckpt "$prev" --method progressive --out "$dir" ${spec#*:} \
      --steps-per-round "$ROUND_STEPS" --lr "$LR" $(resume "$dir")
    ev "$name" --ckpt "$dir"
    prev=$dir
  done
  ev teacher_default --ckpt "$TEACHER"
  for s in 1 2; do          # DPM-Solver++(2M) at 1 and 2 steps is DDIM (first order at its first and final step)
    ev "teacher_ddim$s" --ckpt "$TEACHER" --sampler ddim --steps "$s"
  done
fi

if [ "$PART" = all ] || [ "$PART" = reflow ]; then
  FLOW=$OUT/flow; EVALS=$OUT/flow-evals; mkdir -p "$EVALS"
  finished flow || timed flow $PY -m difflo train --config configs/mnist10k-flow.yaml --out "$FLOW" train.steps="$FLOW_STEPS" \
      train.sample_every=0
  finished reflow || timed reflow $PY -m difflo distill --ckpt "$FLOW" --method reflow --out "$OUT/reflow" --pairs "$PAIRS" \
    --train-steps "$REFLOW_STEPS" --lr "$LR" $(resume "$OUT/reflow")
  ev flow_default --ckpt "$FLOW"
  for s in 1 2 4; do
    ev "flow_euler$s" --ckpt "$FLOW" --sampler euler --steps "$s"
    ev "reflow_euler$s" --ckpt "$OUT/reflow" --sampler euler --steps "$s"
  done
fi
