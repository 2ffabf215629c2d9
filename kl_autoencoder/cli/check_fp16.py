"""`kl-autoencoder check-fp16`: is half precision safe for this VAE? Record the answer as force_upcast."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation import (
    check_fp16,
    load_sample_images,
    set_force_upcast,
    synthetic_images,
)
from . import common
from .common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-fp16",
        help="measure whether fp16/bf16 encode/decode is safe; set force_upcast when it is not",
        description="Encode and decode sample images in fp32, fp16 and bf16; record every layer's largest "
        "activation (forward hooks), report fp16 overflow (> 65504) and each dtype's error against fp32. When "
        "fp16 is unsafe and MODEL is a diffusers folder, set force_upcast=true in its config.json, so diffusers "
        "pipelines decode in fp32. Without IMAGES, synthetic test images are used.",
    )
    p.add_argument("model", metavar="MODEL", help="a diffusers VAE folder, pipeline folder or weights file")
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files or folders (default: synthetic images)")
    p.add_argument("--size", type=positive_int, default=128, help="images are centre-cropped and resized to this (default 128)")
    p.add_argument("--no-write", action="store_true", help="report only; do not change config.json")
    p.add_argument("--fp16", choices=["auto", "native", "emulate"], default="auto",
                   help="real fp16 kernels, or fp32 math rounded to fp16 after every layer (auto: emulate on CPU, "
                   "where fp16 convolution is hundreds of times slower)")
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vae = common.resolve_model(args.model, **common.model_kwargs(args))
    images = load_sample_images(args.images, args.size) if args.images else synthetic_images(size=args.size)
    report = check_fp16(vae, images, label=None if args.images else f"{len(images)} synthetic images, {args.size} px", fp16_mode=args.fp16)
    print(report.format())
    model = Path(args.model)
    if report.fp16_unsafe and not args.no_write:
        if model.is_dir():
            cfg = set_force_upcast(model, True)
            print(f"set force_upcast=true in {cfg}")
        else:
            print(f"note: {args.model} is not a diffusers folder: convert it (`kl-autoencoder convert --to diffusers`) to record force_upcast")
    elif not report.fp16_unsafe:
        print(f"force_upcast left at {getattr(vae.config, 'force_upcast', None)}")
    return 0
