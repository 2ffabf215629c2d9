"""`kl-autoencoder export`: a model as a diffusers folder (or one LDM file)."""

from __future__ import annotations

import argparse

from ..convert import export
from . import common
from .common import MODEL_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as a diffusers folder (or LDM file)",
        description="Write MODEL as a diffusers folder (config.json + safetensors + model card) that "
        "diffusers' from_pretrained loads with no kl-autoencoder code, or with --format ldm as one LDM-layout "
        ".safetensors file for ComfyUI / AUTOMATIC1111. Those build SD's fixed VAE layout (128 base channels, "
        "multipliers 1,2,4,4, two resnets per level, 32 GroupNorm groups, mid-block attention, 4 or 16 latent "
        "channels), so --format ldm refuses any other architecture with the reason, unless --allow-nonstandard. "
        "Files are written readable as the umask says (0644 under umask 022).",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("out", metavar="OUT", help="output folder (diffusers) or .safetensors file (ldm)")
    p.add_argument("--format", choices=["diffusers", "ldm"], default="diffusers", help="default: diffusers")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--notes", default=None, help="text for the model card's 'How it was made' section")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--allow-nonstandard", action="store_true",
                   help="--format ldm: write the file even though ComfyUI/AUTOMATIC1111 cannot build this architecture")
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vae = common.resolve_model(args.model, device="cpu", **common.model_kwargs(args))
    out = export(vae, args.out, format=args.format, dtype=args.dtype, notes=args.notes, force=args.force,
                 allow_nonstandard=args.allow_nonstandard)
    print(f"wrote {out} ({args.format}, {args.dtype})")
    return 0
