"""`kl-autoencoder eval`: reconstruction metrics beside bicubic, PNG and JPEG baselines (``evaluation/report.py``)."""

from __future__ import annotations

import argparse
import sys

from ..evaluation import evaluate
from ..evaluation.fid import INCEPTION_FILE
from ..evaluation.lpips import LPIPS_BACKBONE_FILES
from ..evaluation.report import format_value
from . import common
from .common import (
    MODEL_HELP,
    add_force_arg,
    add_runtime_args,
    add_tiling_args,
    check_output,
    positive_int,
    runtime_kwargs,
    tiling_kwargs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID) beside bicubic, PNG and JPEG baselines",
        description="Reconstruct the images in DATA and write DIR/metrics.json, DIR/metrics.md and DIR/grid.png "
        "(original | reconstruction | error heatmap). PSNR and SSIM on uint8 RGB; LPIPS and rFID when their "
        "weight files are present (otherwise reported unavailable with the file to provide); bicubic x8/x4 "
        "baselines, PNG/JPEG-90 bits per pixel and latent statistics on the same crops.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("data", metavar="DATA", help="an image file or a folder of images (searched recursively)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for metrics.json, metrics.md, grid.png")
    p.add_argument("--size", type=positive_int, default=None, metavar="N",
                   help="resize the short side to N (bicubic) and centre-crop NxN; default: full size cropped to a multiple of 8")
    p.add_argument("--limit", type=positive_int, default=None, metavar="K", help="only the first K images (sorted by path)")
    p.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help=f"torchvision {LPIPS_BACKBONE_FILES['vgg']} (default: $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help=f"torch-fidelity {INCEPTION_FILE} (default: $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--no-compression", action="store_true",
                   help="skip the compression figures (saves two decodes per image: fp16/bf16-rounded latents)")
    add_tiling_args(p)
    add_runtime_args(p)
    add_force_arg(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, args.force, folder=True)  # before any work
    vae = common.resolve_model(args.model, **runtime_kwargs(args), **common.model_kwargs(args))
    r = evaluate(
        vae, args.data, args.output, size=args.size, limit=args.limit, lpips_weights=args.lpips_weights,
        inception_weights=args.inception_weights, compression=not args.no_compression, **tiling_kwargs(args),
    )
    print(
        f"{r['n_images']} images: PSNR {format_value(r['psnr'])} dB, SSIM {format_value(r['ssim'], 4)} "
        f"(bicubic x8 {format_value(r['psnr_bicubic_f8'])} dB, x4 {format_value(r['psnr_bicubic_f4'])} dB) -> {args.output}/metrics.json"
    )
    for v in r["availability"].values():
        if not v["available"]:
            print(f"note: {v['reason']}", file=sys.stderr)
    if r["skipped"]:
        print(f"note: {len(r['skipped'])} file(s) skipped, listed in metrics.json", file=sys.stderr)
    return 0 if r["n_images"] else 1
