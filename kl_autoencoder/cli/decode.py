"""`kl-autoencoder decode`: latents (an encode cache, a shard or a tensor file) -> PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..inference import check_latents
from ..latents import decode_latents, read_latents
from ..model import latent_normalization
from ..utils.images import tensor_to_pil
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

Named = tuple[str, torch.Tensor]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decode",
        help="decode latents (an encode cache, a shard or a tensor file) to PNGs",
        description="Decode LATENTS to PNGs in OUT. An encode output folder or shard: its stored posterior means "
        "(raw), PNGs named after the source images. A .safetensors/.pt tensor file (B, C, h, w) or (C, h, w): "
        "normalised latents as a diffusion model produces ((z - shift) * scale, or the VAE's per-channel / FLUX.2 "
        "BatchNorm rule), or raw with --raw; PNGs 00000.png, ...",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("latents", metavar="LATENTS", help="encode output folder, one shard, or a .safetensors/.pt tensor file")
    p.add_argument("out", metavar="OUT", help="output folder for PNGs")
    p.add_argument("--raw", action="store_true", help="tensor file holds raw VAE latents, not normalised ones")
    p.add_argument("--batch-size", type=positive_int, default=8, help="latents per decoder call (default 8)")
    add_tiling_args(p)
    add_runtime_args(p)
    add_force_arg(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, folder=True)  # before any work
    vae = common.resolve_model(args.model, **runtime_kwargs(args), **common.model_kwargs(args))
    items, cache = read_latents(args.latents)
    if cache:
        print(f"{args.latents}: an encode cache: decoding its stored posterior means as raw latents"
              + (" (--raw is implied)" if not args.raw else ""))
        raw = True
    else:
        raw = args.raw
        print(f"{args.latents}: treating {len(items)} latent(s) as "
              + ("raw VAE latents (--raw)" if raw else
                 f"normalised {latent_normalization(vae).describe()}; pass --raw for raw VAE latents"))
    for name, t in items:
        check_latents(vae, t, name=f"{args.latents}: {name}", raw=raw)  # every item before writing anything
    out = Path(args.out)
    by_shape: dict[tuple, list[Named]] = {}
    for it in items:
        by_shape.setdefault(tuple(it[1].shape), []).append(it)
    n = 0
    for group in by_shape.values():
        for s in range(0, len(group), args.batch_size):
            chunk = group[s : s + args.batch_size]
            images = decode_latents(vae, torch.stack([t for _, t in chunk]), raw=raw, **tiling_kwargs(args))
            for (name, _), im in zip(chunk, tensor_to_pil(images)):
                dest = out / f"{name}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                im.save(dest)
                n += 1
    print(f"wrote {n} PNG(s) to {out}")
    return 0
