"""`kl-autoencoder reconstruct`: encode + decode images, side-by-side PNGs and PSNR."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.metrics import psnr
from ..inference import reconstruct
from ..utils.files import save_json
from ..utils.images import (
    ImageError,
    find_images,
    load_image,
    pil_to_tensor,
    save_grid,
    tensor_to_pil,
)
from . import common
from .common import (
    MODEL_HELP,
    CLIError,
    add_force_arg,
    add_runtime_args,
    add_tiling_args,
    check_output,
    looks_like_model,
    runtime_kwargs,
    tiling_kwargs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="encode + decode images, write side-by-side PNGs and PSNR",
        description="Encode and decode each image (posterior mean), write ORIGINAL | RECONSTRUCTION PNGs "
        "to --out and print PSNR (dB, uint8 RGB). Sizes that are not multiples of 8 are padded for the "
        "VAE and cropped back. MODEL may be omitted to use the shipped default model.",
    )
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGES", help=f"optional MODEL ({MODEL_HELP}), then image files or folders")
    p.add_argument("--model", default=None, help="MODEL, as an option instead of the first argument")
    p.add_argument("--out", required=True, help="output folder")
    add_tiling_args(p)
    add_runtime_args(p)
    add_force_arg(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, folder=True)  # before any work
    inputs = list(args.inputs)
    model_spec = None
    if inputs and looks_like_model(inputs[0]):
        model_spec = inputs.pop(0)
    if not inputs:
        raise CLIError("reconstruct: give at least one image or folder")
    vae = common.resolve_model(model_spec or args.model, **runtime_kwargs(args), **common.model_kwargs(args))
    files = []
    for spec in inputs:
        found = find_images(spec)
        if not found:  # e.g. a model folder without weights, taken for an image folder
            print(f"warning: {spec}: no images found there; skipped", file=sys.stderr)
        files += found
    if not files:
        raise CLIError(f"reconstruct: no images found in {' '.join(inputs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = []
    for f in files:
        try:
            img = load_image(f)
        except ImageError as e:
            print(f"warning: skipped {e}", file=sys.stderr)
            continue
        x = pil_to_tensor(img)[None]  # (1, 3, H, W)
        rec = reconstruct(vae, x, **tiling_kwargs(args))
        score = psnr(x, rec)
        scores.append(score)
        name = f.stem + "_reconstruction.png"
        save_grid([[img, tensor_to_pil(rec)[0]]], out / name)
        print(f"{f}: PSNR {score:.2f} dB -> {out / name}")
    if not scores:
        raise CLIError("reconstruct: no readable images")
    mean = sum(scores) / len(scores)
    print(f"mean PSNR over {len(scores)} image(s): {mean:.2f} dB")
    save_json({"mean_psnr": mean, "n_images": len(scores)}, out / "psnr.json")
    return 0
