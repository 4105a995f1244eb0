#!/usr/bin/env bash
# The Difflo seed's analysis on emoji32 (docs/report-emoji.md): linear vs cosine schedule, EMA vs raw
# weights, DDIM 20/50/100/200 vs DDPM, the guidance scale, and the data set's own scarce classes.
# Every model is trained once into runs/emoji-models (fixed steps, so other load on the machine
# changes only the wall times) and reused by the experiments that need it; the cosine model is the
# config's own recipe, so `difflo experiment recipe` runs of the same config and steps are reused too
# (copy their run folder into runs/emoji-models).
#   difflo data download emoji && bash scripts/emoji_report.sh [TRAIN_STEPS] [N] [SNAPSHOTS]
# Defaults: the 2,042 steps an hour gives the config on a 2-core AVX2 EPYC in fp32; one snapshot (the
# end of training; more snapshots add EMA-over-training points to the ema experiment).
# CONFIG, OUT and RUNS choose the config, the report folder and the model cache, e.g. at 64x64:
#   CONFIG=configs/emoji64-cpu.yaml OUT=docs/report-emoji64 bash scripts/emoji_report.sh 1780
set -euo pipefail
STEPS=${1:-2042}
N=${2:-98}                               # class-balanced samples per setting: one per subcategory
SNAPSHOTS=${3:-1}
CONFIG=${CONFIG:-configs/emoji32.yaml}; OUT=${OUT:-docs/report-emoji}; RUNS=${RUNS:-runs/emoji-models}
COMMON=(--config "$CONFIG" --runs "$RUNS" --train-steps "$STEPS" --snapshots "$SNAPSHOTS"
        --n "$N" --eval-steps 20)
difflo experiment ema "${COMMON[@]}" --eval-steps 10 --out "$OUT/ema"     # 5 weight sets per snapshot: 10 steps each
difflo experiment guidance "${COMMON[@]}" --ws 0,1,2,3,5 --out "$OUT/guidance"
difflo experiment scarcity "${COMMON[@]}" --out "$OUT/scarcity"
difflo experiment steps "${COMMON[@]}" --no-flow --ddim-steps 20,50,100,200 --ddim-etas 0 --dpmpp-steps 10,20 \
  --ddpm-steps 100 --out "$OUT/steps"
difflo experiment schedules "${COMMON[@]}" --schedules linear,cosine --out "$OUT/schedules"
difflo experiment report "$OUT/schedules" "$OUT/ema" "$OUT/steps" "$OUT/guidance" "$OUT/scarcity" \
  --out "$OUT.md"
