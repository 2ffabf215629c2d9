#!/usr/bin/env bash
# Turn the training runs of tools/train_shipped_model.sh into weights/kl-f8c4-bsds-cpu:
# fp16 diffusers export of the last phase, scaling factor measured with `stats` on BSDS500 val, Kodak
# figures from `eval`, and the model card. Every figure in the card comes from these commands.
set -euo pipefail
cd "$(dirname "$0")/.."
BSDS=${BSDS:-../shared/data/bsds500}
KODAK=${KODAK:-../shared/data/kodak}
RUN_DIR=${RUN_DIR:-runs/kl-f8c4-cpu}  # phase 1; phases 2 and 3 are $RUN_DIR-phase2 and $RUN_DIR-phase3
OUT=${OUT:-weights/kl-f8c4-bsds-cpu}
KL=${KL:-.venv/bin/kl-autoencoder}
PY=${PY:-.venv/bin/python}
LAST="$RUN_DIR-phase3"
"$KL" export "$LAST/export" "$OUT" --dtype fp16
# SD-style layout (no shift): diffusers SD/DiT pipelines divide by scaling_factor and ignore a shift
"$KL" stats "$OUT" "$BSDS/val" --resolution 256 --no-shift --write | tee "$LAST/stats.txt"
"$KL" eval "$OUT" "$KODAK" --output "$OUT/eval-kodak" | tee "$LAST/eval-kodak.txt"
"$PY" tools/write_model_card.py --runs "$RUN_DIR" "$RUN_DIR-phase2" "$LAST" --model "$OUT"
