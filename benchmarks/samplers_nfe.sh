#!/usr/bin/env bash
# Quality vs NFE of every registered sampler (issue 19), for the README's sampler table: the shipped demo
# digit model and a colour model, each at NFE 5, 8, 10, 15, 20, 50 on the same seeds, N class-balanced samples
# per row scored by fd_classifier (the data set's classifier features) and class accuracy, with the real-data
# noise floor at the same N. Reports: OUT/demo/report.md and OUT/<run name>/report.md (printed as they finish).
#   bash benchmarks/samplers_nfe.sh [COLOUR_RUN] [N]      # defaults runs/emoji32 and 500
#   GRIDS=trailing,karras,exponential NFE=5,10 bash benchmarks/samplers_nfe.sh runs/emoji32 200
#   SAMPLERS=ddim,dpmpp,dpmpp_3m bash benchmarks/samplers_nfe.sh     # a subset (euler_ancestral = ddpm's images)
# Cost: the sum of the NFE budgets (108) times the samplers (6 for a diffusion model) per image and grid.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/emoji32}; N=${2:-500}; OUT=${OUT:-runs/samplers-nfe}; PY=${PYTHON:-.venv/bin/python}
NFE=${NFE:-5,8,10,15,20,50}; GRIDS=${GRIDS:-trailing}; SEED=${SEED:-0}
ARGS=(--n "$N" --nfe "$NFE" --grids "$GRIDS" --seed "$SEED" ${SAMPLERS:+--samplers "$SAMPLERS"})
$PY benchmarks/samplers_nfe.py --ckpt demo "${ARGS[@]}" --out "$OUT/demo"
$PY benchmarks/samplers_nfe.py --ckpt "$RUN" "${ARGS[@]}" --out "$OUT/$(basename "$RUN")"
