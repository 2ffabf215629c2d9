#!/usr/bin/env bash
# Turn the last training phase of tools/train_shipped_model.sh into weights/kl-f8c4-bsds-urban-cpu:
# fp16 diffusers export, scaling factor measured with `stats` on BSDS500 val, Kodak and BSDS500-val figures from
# `eval`, the demo's per-photo figures, the colour check (plain diffusers), and the model card. Every figure in
# the card comes from these commands. Re-runnable: every output is this script's own, so each is replaced (--force).
set -euo pipefail
cd "$(dirname "$0")/.."
BSDS=${BSDS:-../shared/data/bsds500}
KODAK=${KODAK:-../shared/data/kodak}
P4_DIR=${P4_DIR:-runs/ab-g8}
P5_DIR=${P5_DIR:-runs/p5-urban-ddp}
P6_DIR=${P6_DIR:-runs/p6-jitter}
P7_DIR=${P7_DIR:-runs/p7-cosine}
P8_DIR=${P8_DIR:-runs/p8-sizes}
LAST=${LAST:-$P8_DIR}
OUT=${OUT:-weights/kl-f8c4-bsds-urban-cpu}
KL=${KL:-.venv/bin/kl-autoencoder}
PY=${PY:-.venv/bin/python}
"$KL" export "$LAST/export" "$OUT" --dtype fp16 --force
# SD-style layout (no shift): diffusers SD/DiT pipelines divide by scaling_factor and ignore a shift
"$KL" stats "$OUT" "$BSDS/val" --resolution 256 --no-shift --write | tee "$LAST/stats.txt"
"$KL" eval "$OUT" "$KODAK" --output "$OUT/eval-kodak" --force | tee "$LAST/eval-kodak.txt"
# BSDS500 val (never trained on): full images centre-cropped to a multiple of 8, as the Kodak report
"$KL" eval "$OUT" "$BSDS/val" --output "$LAST/eval-bsds-val" --no-compression --force | tee "$LAST/eval-bsds-val.txt"
mkdir -p "$OUT/eval-bsds-val"
cp "$LAST/eval-bsds-val/metrics.json" "$LAST/eval-bsds-val/metrics.md" "$OUT/eval-bsds-val/"
"$KL" demo --model "$OUT" --out "$LAST/demo" | tee "$LAST/demo.txt"
mkdir -p "$OUT/eval-demo"
cp "$LAST/demo/demo.json" "$LAST/demo/demo_reconstructions.png" "$OUT/eval-demo/"
"$PY" tools/colour_check.py "$OUT" --kodak "$KODAK" --json "$OUT/eval-colour.json" | tee "$LAST/colour.txt"
"$PY" tools/write_model_card.py --runs "$P4_DIR" "$P5_DIR" "$P6_DIR" "$P7_DIR" "$P8_DIR" --model "$OUT"
