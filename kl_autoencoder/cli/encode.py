"""`kl-autoencoder encode`: image folders or webdataset tars -> a sharded, resumable latent cache (``latents/writer.py``)."""

from __future__ import annotations

import argparse
import sys

from ..latents import RayOptions, encode_dataset
from ..latents.variants import FLIP_CHOICES
from ..latents.writer import ENGINES
from ..model import DTYPES
from . import common
from .common import (
    MODEL_HELP,
    add_runtime_args,
    add_tiling_args,
    non_negative_int,
    positive_int,
    runtime_kwargs,
    tiling_kwargs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode",
        help="encode an image folder or webdataset tars into a sharded, resumable latent cache",
        description="Encode every sample of DATA into OUT: safetensors shards of raw posterior mean and "
        "log-variance per sample (every --resolution, and the mirror image with --flip both), its caption and "
        "metadata, original size and crop box, and OUT/manifest.json (model hash, scaling/shift factors, "
        "transform, counts, skipped inputs). Run the same command again after a crash or after changing images: "
        "finished work is kept, changed images are re-encoded. Under `accelerate launch` every process encodes "
        "its own share (whole tars for webdataset inputs); --engine ray runs it as a Ray Data pipeline.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("data", metavar="DATA",
                   help="an image folder (recursive; captions from metadata.jsonl/metadata.csv or photo.txt sidecars), "
                   "one image, or webdataset tars: a path, glob, brace pattern 'shards/{00000..00127}.tar', "
                   "'a.tar::b.tar', or a URL webdataset opens (pipe:CMD, https://...)")
    p.add_argument("out", metavar="OUT", help="output folder for shards and manifest.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resolution", default=None, metavar="N[,N...]",
                   help="centre crop to N x N pixels (multiple of 8; default 256); several, e.g. 256,512, are all "
                   "stored and LatentDataset(resolution=N) reads one")
    g.add_argument("--buckets", type=positive_int, default=None, metavar="AREA",
                   help="aspect-ratio buckets with sides multiples of 64 and about AREA pixels (e.g. 65536 for 256^2)")
    p.add_argument("--flip", choices=FLIP_CHOICES, default="none",
                   help="both: also store the mirror image's moments (LatentDataset(random_flip=True)); default none")
    p.add_argument("--caption-key", default=None, metavar="NAME",
                   help="where captions are: the metadata-table column, sidecar suffix and tar member "
                   "(default: column 'text', sidecar .txt or .caption, member 'txt')")
    p.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard file (default 256)")
    p.add_argument("--latent-dtype", choices=list(DTYPES), default="fp32",
                   help="dtype the moments are stored in (default fp32); --dtype is the dtype the encoder runs in")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images per encoder call (default 8; halved and retried on out-of-memory, counted in the manifest)")
    p.add_argument("--num-workers", type=non_negative_int, default=2,
                   help="DataLoader worker processes for decoding/resizing (0: in-process)")
    p.add_argument("--overwrite", action="store_true", help="delete a cache made with another model/transform/dtype in OUT")
    p.add_argument("--engine", choices=ENGINES, default="default",
                   help="default: this process (or each `accelerate launch` process); ray: a Ray Data pipeline with "
                   "an encoder actor pool (pip install 'kl-autoencoder[ray]'; joins RAY_ADDRESS if set)")
    p.add_argument("--ray-actors", type=int, default=None, help="--engine ray: encoder actors (default: one per GPU, else CPUs/4)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=None, help="--engine ray: CPUs reserved per encoder actor")
    p.add_argument("--ray-gpus-per-actor", type=float, default=None, help="--engine ray: GPUs per encoder actor (default 1 if the cluster has GPUs)")
    add_tiling_args(p)
    add_runtime_args(p)
    # --model-dtype: this command's name for --dtype before every command had --dtype
    p.add_argument("--model-dtype", dest="dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vae = common.resolve_model(args.model, **runtime_kwargs(args), **common.model_kwargs(args))
    ray = RayOptions(actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor, gpus_per_actor=args.ray_gpus_per_actor)
    res = encode_dataset(
        vae, args.data, args.out, resolution=args.resolution or 256, buckets=args.buckets, shard_size=args.shard_size,
        dtype=args.latent_dtype, batch_size=args.batch_size, num_workers=args.num_workers, overwrite=args.overwrite,
        model_name=args.model, flip=args.flip, caption_key=args.caption_key, engine=args.engine, ray=ray,
        **tiling_kwargs(args),
    )
    print(f"{res.n_samples} samples in {res.out / 'manifest.json'}: encoded {res.n_encoded}, unchanged {res.n_unchanged}, "
          f"re-captioned {res.n_recaptioned}, skipped {res.n_skipped}, without caption {res.n_no_caption}; "
          f"{res.images_per_s:.2f} images/s")
    if res.n_samples == 0:
        print(f"error: {args.data}: no sample could be encoded; manifest.json lists each input and why it was skipped",
              file=sys.stderr)
        return 1
    return 0
