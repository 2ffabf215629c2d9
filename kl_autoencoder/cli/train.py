"""`kl-autoencoder train`: train or fine-tune a VAE (``training/trainer.py``); resumes when run again."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_config
from ..training import train
from .common import positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a VAE (resumes when run again)",
        description="Train a KL-VAE with the LDM objective (L1/L2 + LPIPS + KL + PatchGAN) from a preset or YAML "
        "config on a folder of images. Running the same command again resumes from the newest checkpoint in "
        "RUN_DIR. Works under `accelerate launch` for several processes/GPUs/nodes. At the end RUN_DIR/export/ "
        "holds a diffusers folder (EMA weights when EMA is on). LPIPS needs torchvision's vgg16-397923af.pth in "
        "$TORCH_HOME/hub/checkpoints (or --set loss.lpips_weights=PATH, or --set loss.perceptual=none).",
    )
    p.add_argument("config", metavar="CONFIG", help="preset name (tiny-kl-f8, sd-kl-f8, ldm-kl-f8, ...) or YAML path")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR", help="folder(s) of training images (recursive: jpg, png, webp, bmp, tiff)")
    p.add_argument("--output", required=True, metavar="RUN_DIR", help="run directory: config.yaml, status.json, checkpoints/, export/")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimiser steps (overrides train.max_steps)")
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop (checkpoint + export) after this many minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 --set loss.perceptual=none (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.max_minutes is not None:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    status = train(cfg, args.data, args.output)
    print(f"done: step {status['step']}, {status['images_seen']} images seen; model in {Path(args.output) / 'export'}")
    return 0
