"""`kl-autoencoder encode`: an image folder -> a sharded, resumable latent cache (``latents/writer.py``)."""

from __future__ import annotations

import argparse

from ..latents import encode_dataset
from ..model import DTYPES
from . import common
from .common import MODEL_HELP, add_tiling_args, tiling_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="encode an image folder into a sharded, resumable latent cache",
        description="Encode every image under DATA (recursive) into OUT: safetensors shards of raw posterior "
        "mean and log-variance per image, per-image metadata (path, sha256, original size, crop box) and "
        "OUT/manifest.json (model hash, scaling/shift factors, transform, counts, skipped files). Run the "
        "same command again after a crash or after changing images: finished work is kept, changed images "
        "are re-encoded. Under `accelerate launch` every process encodes its own share.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("data", metavar="DATA", help="image folder (searched recursively) or one image file")
    p.add_argument("out", metavar="OUT", help="output folder for shards and manifest.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resolution", type=int, default=None, help="centre crop to N x N pixels (multiple of 8; default 256)")
    g.add_argument("--buckets", type=int, default=None, metavar="AREA",
                   help="aspect-ratio buckets with sides multiples of 64 and about AREA pixels (e.g. 65536 for 256^2)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file (default 256)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="stored latent dtype (default fp32)")
    p.add_argument("--model-dtype", choices=list(DTYPES), default=None, help="run the encoder in this dtype (default: as loaded)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes for decoding/resizing (0: in-process)")
    p.add_argument("--overwrite", action="store_true", help="delete a cache made with another model/transform/dtype in OUT")
    add_tiling_args(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vae = common.resolve_model(args.model, dtype=args.model_dtype, **common.model_kwargs(args))
    res = encode_dataset(
        vae, args.data, args.out, resolution=args.resolution or 256, buckets=args.buckets, shard_size=args.shard_size,
        dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers, overwrite=args.overwrite,
        model_name=args.model, **tiling_kwargs(args),
    )
    print(f"{res.n_samples} samples in {res.out / 'manifest.json'}: encoded {res.n_encoded}, "
          f"unchanged {res.n_unchanged}, skipped {res.n_skipped}; {res.images_per_s:.2f} images/s")
    return 0
