#!/usr/bin/env bash
# The exact commands that produced weights/kl-f8c4-bsds-cpu. Resumable: run it again to continue.
# Needs ../shared/data/bsds500 (BSDS500: research and education use). Never trains on Kodak.
#   RUN_DIR (default runs/kl-f8c4-cpu)   MINUTES (default 600): wall-clock budget per invocation
set -euo pipefail
cd "$(dirname "$0")/.."
BSDS=${BSDS:-../shared/data/bsds500}
RUN_DIR=${RUN_DIR:-runs/kl-f8c4-cpu}
MINUTES=${MINUTES:-600}
KL=${KL:-.venv/bin/kl-autoencoder}
nice -n 19 "$KL" train configs/kl-f8c4-cpu.yaml --data "$BSDS/train" "$BSDS/test" --output "$RUN_DIR" \
  --set data.val_dir="$BSDS/val" --max-minutes "$MINUTES"
