"""`kl-autoencoder stats`: latent scaling (1/std) and shift (mean) factors measured on a dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..convert import vae_folder
from ..latents import stats_of_cache, stats_of_folder, write_factors
from . import common
from .common import (
    MODEL_HELP,
    CLIError,
    add_runtime_args,
    add_tiling_args,
    non_negative_int,
    positive_int,
    runtime_kwargs,
    tiling_kwargs,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="measure latent scaling (1/std) and shift (mean) factors, or per-channel statistics, on a dataset",
        description="Encode DATA (an image folder, centre-cropped to --resolution; or an `encode` output folder, "
        "whose stored moments are used) and print scaling_factor = 1/std and shift_factor = mean of the latents, "
        "with their spread across batches, and the mean and std of every channel (of the 2x2-patchified latents "
        "for FLUX.2). --write stores the factors in MODEL's config.json; with --per-channel latents_mean/latents_std "
        "instead (Playground v2.5's normalisation); for a FLUX.2 VAE its BatchNorm running_mean/running_var.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("data", metavar="DATA", help="image folder (recursive) or an encode output folder")
    p.add_argument("--write", action="store_true", help="store the factors in MODEL's config.json (a diffusers folder)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default 8); one factor per batch for the spread")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most K images (a seeded random subset)")
    p.add_argument("--resolution", type=positive_int, default=256, help="centre crop size for image folders (default 256)")
    p.add_argument("--mode", choices=["sample", "mean"], default="sample",
                   help="measure posterior samples (default, as LDM) or posterior means")
    p.add_argument("--per-channel", action="store_true",
                   help="--write latents_mean/latents_std (per-channel normalisation) instead of scaling/shift factors")
    p.add_argument("--no-shift", action="store_true",
                   help="write shift_factor null (SD 1.x/2.x layout: diffusers SD pipelines ignore shift_factor)")
    p.add_argument("--seed", type=int, default=0, help="seed for posterior samples and --limit (default 0)")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="DataLoader workers (0: in-process)")
    add_tiling_args(p)
    add_runtime_args(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    sample, shift = args.mode == "sample", not args.no_shift
    if args.write and (not Path(args.model).is_dir() or vae_folder(args.model) is None):  # fail before the work
        raise CLIError(f"{args.model}: --write needs a diffusers model folder with a config.json "
                       "(export one with `kl-autoencoder export`)")
    if (data / "manifest.json").is_file():  # an encode cache: its stored moments, no encoder needed
        stats = stats_of_cache(data, batch_size=args.batch_size, limit=args.limit, sample=sample, seed=args.seed, shift=shift)
    else:
        stats = stats_of_folder(common.resolve_model(args.model, **runtime_kwargs(args), **common.model_kwargs(args)), data, resolution=args.resolution, batch_size=args.batch_size,
                                limit=args.limit, sample=sample, seed=args.seed, shift=shift,
                                num_workers=args.num_workers, **tiling_kwargs(args))
    print(json.dumps({k: v for k, v in stats.to_dict().items() if k != "batch_scaling_factors"}, indent=2))
    print(f"scaling_factor {stats.scaling_factor:.5f} +- {stats.sem:.5f} (spread across {stats.n_batches} batches "
          f"{stats.spread:.5f}), shift_factor {stats.shift_factor}")
    if args.write:
        print(f"wrote the measured normalisation to {write_factors(args.model, stats, per_channel=args.per_channel)}")
    return 0
