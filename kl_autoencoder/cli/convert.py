"""`kl-autoencoder convert`: a VAE between diffusers and LDM layouts, strictly and offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert import export, hub_vae_folder, load, looks_like_repo_id, read_vae, save_ldm
from ..model import DTYPE_NAMES, FAMILIES, apply_family, latent_normalization


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a VAE between diffusers and LDM layouts (strict, offline)",
        description="Convert a VAE between a diffusers folder and one LDM-layout .safetensors file "
        "(ComfyUI / AUTOMATIC1111). IN may be a diffusers folder, a pipeline folder, a Hugging Face Hub id, or "
        "a weights file (.safetensors/.ckpt/.pt/.bin/.pth) in either layout, including full SD checkpoints "
        "(first_stage_model.*) and FLUX.2 VAE files (bn.* BatchNorm buffers). Every key must map and every shape "
        "must match; pickles are read weights-only (code in them never runs). The architecture is read from "
        "tensor shapes; --family sets the latent factors shapes cannot tell. --to ldm refuses architectures "
        "ComfyUI/AUTOMATIC1111 cannot build unless --allow-nonstandard.",
    )
    p.add_argument("input", metavar="IN", help="diffusers folder, weights file or hub id")
    p.add_argument("output", metavar="OUT", help="output folder (--to diffusers) or .safetensors file (--to ldm)")
    p.add_argument("--to", choices=["diffusers", "ldm"], required=True, help="target layout")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="weights dtype (default: as stored in a weights file IN; fp32 for a folder)")
    p.add_argument("--scaling-factor", type=float, default=None, help="set the latent scaling factor (default: from IN's metadata)")
    p.add_argument("--shift-factor", type=float, default=None, help="set the latent shift factor (default: from IN's metadata)")
    p.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="set the published factors and force_upcast of a VAE family (model/families.py cites each)")
    p.add_argument("--revision", default=None, help="hub id IN: a branch, tag or commit")
    p.add_argument("--offline", action="store_true", help="hub id IN: the Hugging Face cache only (as HF_HUB_OFFLINE=1)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--allow-nonstandard", action="store_true",
                   help="--to ldm: write the file even though ComfyUI/AUTOMATIC1111 cannot build this architecture")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN/inf values (refused otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.input)
    if not src.exists() and looks_like_repo_id(args.input):
        src = hub_vae_folder(args.input, revision=args.revision, offline=args.offline)
    if src.is_dir():
        vae, info = load(src, allow_nonfinite=args.allow_nonfinite), {"dtype": None, "layout": "diffusers"}
        if args.family:
            apply_family(vae, args.family, str(src))
        factors = {"scaling_factor": args.scaling_factor, "shift_factor": args.shift_factor}
        vae.register_to_config(**{k: v for k, v in factors.items() if v is not None})
    else:
        vae, info = read_vae(src, scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, family=args.family,
                             allow_nonfinite=args.allow_nonfinite)
    dtype = args.dtype or DTYPE_NAMES.get(info["dtype"] or next(vae.parameters()).dtype, "fp32")
    if args.to == "ldm":
        out = save_ldm(vae, args.output, dtype=dtype, force=args.force, allow_nonstandard=args.allow_nonstandard)
    else:
        out = export(vae, args.output, dtype=dtype, force=args.force)
    c = vae.config
    print(f"{args.input} ({info['layout']}) -> {out} ({args.to}, {dtype}): {type(vae).__name__}, channels "
          f"{list(c.block_out_channels)}, {c.layers_per_block} resnets/level, {c.latent_channels} latent channels, "
          f"latents {latent_normalization(vae).describe()}")
    return 0
