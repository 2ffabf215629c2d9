"""`kl-autoencoder swap`: a copy of a diffusers pipeline with its VAE replaced, after a latent check."""

from __future__ import annotations

import argparse

from ..pipelines import IncompatibleVAEError, swap_vae
from . import common
from .common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "swap",
        help="write a copy of a diffusers pipeline with its VAE replaced, after a latent-compatibility check",
        description="Write OUT_DIR: a copy of the diffusers pipeline PIPELINE_DIR (large files hard-linked, "
        "model_index.json unchanged) with vae/ replaced by VAE. First prints a compatibility report: latent "
        "channels, scaling/shift factors and, on sample images, the PSNR of current-encoder -> new-decoder "
        "reconstructions next to each VAE's own and the distance of the two latent codes. A VAE whose latent "
        "space does not match is refused (exit status 1) unless --force; differing latent channels always are.",
    )
    p.add_argument("pipeline", metavar="PIPELINE_DIR", help="diffusers pipeline folder (model_index.json, vae/, unet/, ...)")
    p.add_argument("vae", metavar="VAE", help="the new VAE: a diffusers folder or weights file (diffusers or LDM layout)")
    p.add_argument("out", metavar="OUT_DIR", help="new pipeline folder (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="swap even if the latent spaces disagree")
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGE", help="images/folders for the check (default: synthetic images)")
    p.add_argument("--size", type=positive_int, default=128, help="check images are centre-cropped and resized to this (default 128)")
    p.add_argument("--copy", action="store_true", help="copy every file instead of hard-linking the large ones")
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vae = common.resolve_model(args.vae, device="cpu", **common.model_kwargs(args))  # the pipeline's own VAE is read on the CPU too
    try:
        report = swap_vae(args.pipeline, vae, args.out, force=args.force, images=args.images or None, size=args.size,
                          link=not args.copy, show=lambda r: print(r.format(), flush=True))
    except IncompatibleVAEError as e:
        hint = "" if any("channels" in m for m in e.report.problems) else " (--force swaps anyway)"
        print(f"refused: nothing written{hint}")
        return 1
    print(f"wrote {report.out_dir}")
    return 0
