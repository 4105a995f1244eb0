#!/usr/bin/env bash
# Progressive-distillation settings compared at the same distillation budget (total student steps), on the demo-sized
# teacher of benchmarks/distill_demo.sh: each row distils to a 4-step student and scores it at N = 1000 (same seeds,
# same reference as distill_demo.sh, whose floor and teacher rows it sits beside):
#   bash benchmarks/distill_sweep.sh TEACHER_RUN [OUT] [TOTAL_STEPS]     # ~14 minutes a row on 2 cores
# A row is NAME:TEACHER_STEPS:ROUNDS:LR[:LO,HI] (ROWS overrides the list); its rounds share TOTAL_STEPS (default 390).
# With LO,HI the student takes w as an input (--w-range) and is scored at each w of WS (default 1.5 2 3).
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${1:?usage: bash benchmarks/distill_sweep.sh TEACHER_RUN [OUT] [TOTAL_STEPS]}
OUT=${2:-runs/distill-demo}; TOTAL=${3:-390}
PY=${PYTHON:-.venv/bin/python}; N=${N:-1000}; REF=${REF:-$OUT/ref.npz}
ROWS=${ROWS:-"r3-lr1e-3:32:3:1e-3 r1-lr1e-3:8:1:1e-3"}
[ -f "$REF" ] || $PY -m difflo eval fid-ref --data mnist10k --split test --out "$REF"
for row in $ROWS; do
  IFS=: read -r name n0 rounds lr wrange <<<"$row"
  dir="$OUT/sweep-$name"; [ -d "$dir" ] && RESUME=--resume || RESUME=
  /usr/bin/time -f "$name: distill wall %e s, user+sys %U+%S s" $PY -m difflo distill --ckpt "$TEACHER" \
    --method progressive --out "$dir" --teacher-steps "$n0" --rounds "$rounds" \
    --steps-per-round $((TOTAL / rounds)) --lr "$lr" ${wrange:+--w-range "$wrange"} $RESUME 2>&1 | tail -2 | tee "$dir.txt"
  if [ -z "$wrange" ]; then
    $PY -m difflo eval model --ckpt "$dir" --n "$N" --ref "$REF" --json "$dir.json" | tee -a "$dir.txt"
  else
    for w in ${WS:-1.5 2 3}; do
      $PY -m difflo eval model --ckpt "$dir" --n "$N" --ref "$REF" --w "$w" --json "$dir-w$w.json" | tee -a "$dir.txt"
    done
  fi
done
