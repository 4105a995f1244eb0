#!/usr/bin/env bash
# A few-step student of a demo-sized teacher, measured against it at N = 1000 (Inception FID vs the held-out
# mnist10k test split, its real-vs-real floor at the same N, class accuracy), the same seeds for every row:
#   bash benchmarks/distill_demo.sh TEACHER_RUN [OUT]       # ~30 minutes on 2 cores
# Rows: the teacher with its default sampler; the teacher with training-free solvers at 4 network calls per
# image (guided: 2 steps of DPM-Solver++(2M), of DDIM); the progressive-distillation student at 4 steps (4 calls,
# guidance distilled in); with ALL=1 also its 8-step round and DDIM at 2 guided steps. The distillation's CPU time is printed next to the teacher's.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${1:?usage: bash benchmarks/distill_demo.sh TEACHER_RUN [OUT]}; OUT=${2:-runs/distill-demo}
PY=${PYTHON:-.venv/bin/python}; N=${N:-1000}
ROUND_STEPS=${ROUND_STEPS:-130}; LR=${LR:-2e-4}
mkdir -p "$OUT"
REF=${REF:-$OUT/ref.npz}                      # e.g. a recipe run's eval_ref_inception.npz (the same test split)
[ -f "$REF" ] || $PY -m difflo eval fid-ref --data mnist10k --split test --out "$REF"
$PY - "$OUT/train-$N.npz" "$N" <<'PY'
import sys, numpy as np
from difflo import data
ds = data.load("mnist10k", "train")
idx = np.random.default_rng(0).permutation(len(ds))[:int(sys.argv[2])]
np.savez(sys.argv[1], images=ds.images[idx], labels=ds.labels[idx])
PY
$PY -m difflo eval fid --samples "$OUT/train-$N.npz" --ref "$REF" | tee "$OUT/floor.txt"
[ -d "$OUT/student" ] && RESUME=--resume || RESUME=
/usr/bin/time -f "distill wall %e s, user+sys %U+%S s" $PY -m difflo distill --ckpt "$TEACHER" --method progressive \
  --out "$OUT/student" --teacher-steps 32 --rounds 3 --steps-per-round "$ROUND_STEPS" --lr "$LR" $RESUME \
  2>&1 | tail -4 | tee "$OUT/distill.txt"
ev() { name=$1; shift; $PY -m difflo eval model --n "$N" --ref "$REF" --json "$OUT/$name.json" "$@" \
       | tee "$OUT/$name.txt"; }
ev student4 --ckpt "$OUT/student"
[ -n "${ALL:-}" ] && ev student8 --ckpt "$OUT/student/students/steps_8"
ev teacher_default --ckpt "$TEACHER"
ev teacher_dpmpp2 --ckpt "$TEACHER" --sampler dpmpp --steps 2
[ -n "${ALL:-}" ] && ev teacher_ddim2 --ckpt "$TEACHER" --sampler ddim --steps 2
grep -h "elapsed_s" -A0 "$TEACHER/metrics.csv" >/dev/null && tail -1 "$TEACHER/metrics.csv" | cut -d, -f1,5 \
  | sed 's/^/teacher step,train seconds: /' | tee "$OUT/teacher_time.txt"
