#!/usr/bin/env bash
# Turn the training run of tools/train_shipped_model.sh into weights/kl-f8c4-bsds-cpu:
# fp16 diffusers export, scaling factor measured with `stats` on BSDS500 val, Kodak figures from `eval`,
# and the model card. Every figure in the card comes from these commands.
set -euo pipefail
cd "$(dirname "$0")/.."
BSDS=${BSDS:-../shared/data/bsds500}
KODAK=${KODAK:-../shared/data/kodak}
RUN_DIR=${RUN_DIR:-runs/kl-f8c4-cpu-phase2}
OUT=${OUT:-weights/kl-f8c4-bsds-cpu}
KL=${KL:-.venv/bin/kl-autoencoder}
PY=${PY:-.venv/bin/python}
"$KL" export "$RUN_DIR/export" "$OUT" --dtype fp16
# SD-style layout (no shift): diffusers SD/DiT pipelines divide by scaling_factor and ignore a shift
"$KL" stats "$OUT" "$BSDS/val" --resolution 256 --no-shift --write | tee "$RUN_DIR/stats.txt"
"$KL" eval "$OUT" "$KODAK" --output "$OUT/eval-kodak" | tee "$RUN_DIR/eval-kodak.txt"
"$PY" tools/write_model_card.py --run "$RUN_DIR" --model "$OUT" --phase1 "${PHASE1_DIR:-${RUN_DIR%-phase2}}"
