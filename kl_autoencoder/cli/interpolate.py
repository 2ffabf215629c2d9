"""`kl-autoencoder interpolate`: a walk between the latents of two images, decoded into one strip."""

from __future__ import annotations

import argparse

from ..evaluation.interpolation import (
    MODES,
    as_one_image,
    interpolate,
    match_sizes,
    save_strip,
)
from . import common
from .common import (
    MODEL_HELP,
    CLIError,
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
        "interpolate",
        help="decode a walk between the latents of two images into one strip image",
        description="Encode images A and B (posterior means, normalised latents), interpolate between the latents "
        "(slerp: great-circle direction with linearly interpolated norm; or lerp) and decode N steps into one "
        "strip, left to right from A to B. Both ends are included and equal the plain reconstructions. "
        "Sizes: with --size S both images are resized (short side S) and centre-cropped to SxS; otherwise "
        "images of one size are used as they are, and a B of another size is resized and centre-cropped to "
        "A's size. The command prints which was done.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("a", metavar="A", help="first image (left end of the strip)")
    p.add_argument("b", metavar="B", help="second image (right end of the strip)")
    p.add_argument("--steps", type=positive_int, default=8, metavar="N", help="number of images in the strip, >= 2, ends included (default 8)")
    p.add_argument("--out", required=True, metavar="FILE", help="output image, e.g. strip.png")
    p.add_argument("--mode", choices=MODES, default="slerp", help="slerp (default) or lerp")
    p.add_argument("--size", type=positive_int, default=None, metavar="S", help="resize (short side S) and centre-crop both images to SxS")
    add_tiling_args(p)
    add_runtime_args(p)
    add_force_arg(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, folder=False)  # before any work
    if args.steps < 2:
        raise CLIError(f"--steps {args.steps}: need at least 2 (both ends are included)")
    vae = common.resolve_model(args.model, **runtime_kwargs(args), **common.model_kwargs(args))
    xa, xb = as_one_image(args.a, args.a), as_one_image(args.b, args.b)
    xa, xb, note = match_sizes(xa, xb, args.size)
    print(f"sizes: {note}")
    images = interpolate(vae, xa, xb, args.steps, args.mode, **tiling_kwargs(args))
    out = save_strip(images, args.out)
    print(f"wrote {out}: {args.steps} steps ({args.mode}), each {images.shape[-1]}x{images.shape[-2]}")
    return 0
