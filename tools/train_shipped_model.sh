#!/usr/bin/env bash
# The exact commands that produced weights/kl-f8c4-bsds-cpu. Resumable: run it again to continue.
# Needs ../shared/data/bsds500 (BSDS500: research and education use). Never trains on Kodak.
# Phase 1: L1 + KL at constant lr (configs/kl-f8c4-cpu.yaml). Phase 2: from phase 1's EMA export,
# L2 (what PSNR measures) with a cosine decay of the lr to 0, on 256px crops: a model trained only on
# 96px crops reconstructs 128px crops of Kodak above the bicubic baseline but full images 3-6 dB worse
# (GroupNorm statistics of a whole image differ from a small crop's; zeroing the attention did not help).
# Phase 3: from phase 2's export, L2 on 320px crops (nearly whole BSDS images, 481x321), lr 2e-4 cosine.
#   RUN_DIR (default runs/kl-f8c4-cpu)   MINUTES1/2/3: wall-clock budget of each phase per invocation
set -euo pipefail
cd "$(dirname "$0")/.."
BSDS=${BSDS:-../shared/data/bsds500}
RUN_DIR=${RUN_DIR:-runs/kl-f8c4-cpu}
MINUTES1=${MINUTES1:-45}
MINUTES2=${MINUTES2:-25}
MINUTES3=${MINUTES3:-115}
PHASE2_STEPS=${PHASE2_STEPS:-850}
PHASE3_STEPS=${PHASE3_STEPS:-3600}
KL=${KL:-.venv/bin/kl-autoencoder}
if [ ! -d "$RUN_DIR/export" ]; then
  nice -n 19 "$KL" train configs/kl-f8c4-cpu.yaml --data "$BSDS/train" "$BSDS/test" --output "$RUN_DIR" \
    --set data.val_dir="$BSDS/val" --max-minutes "$MINUTES1"
fi
nice -n 19 "$KL" train configs/kl-f8c4-cpu.yaml --data "$BSDS/train" "$BSDS/test" --output "$RUN_DIR-phase2" \
  --set data.val_dir="$BSDS/val" --set train.init_from="$RUN_DIR/export" --set loss.reconstruction=l2 \
  --set train.lr=1.5e-4 --set train.warmup_steps=0 --set train.lr_schedule=cosine --set data.crop_size=256 --set train.batch_size=2 \
  --max-steps "$PHASE2_STEPS" --max-minutes "$MINUTES2"
nice -n 19 "$KL" train configs/kl-f8c4-cpu.yaml --data "$BSDS/train" "$BSDS/test" --output "$RUN_DIR-phase3" \
  --set data.val_dir="$BSDS/val" --set train.init_from="$RUN_DIR-phase2/export" --set loss.reconstruction=l2 \
  --set train.lr=2e-4 --set train.warmup_steps=50 --set train.lr_schedule=cosine --set data.crop_size=320 --set train.batch_size=2 \
  --set train.eval_every=600 --max-steps "$PHASE3_STEPS" --max-minutes "$MINUTES3"
