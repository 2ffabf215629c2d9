"""`kl-autoencoder score`: per-image anomaly scores as a CSV, worst first (``evaluation/anomaly.py``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..evaluation.anomaly import (
    DEFAULT_SIGMA,
    SORT_KEYS,
    score_images,
    sort_rows,
    write_csv,
)
from ..utils.images import find_images
from ..utils.locks import output_lock
from . import common
from .common import (
    MODEL_HELP,
    CLIError,
    add_force_arg,
    add_runtime_args,
    check_output,
    non_negative_int,
    positive_float,
    positive_int,
    runtime_kwargs,
)

log = logging.getLogger("kl_autoencoder")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="per-image anomaly scores (reconstruction error, negative ELBO in bits/dim) as a CSV, worst first",
        description="Score every image in DATA with the VAE and write a CSV sorted worst first. Columns: score = "
        "bpd - png_bpd (the negative ELBO corrected for the image's PNG length, Serra et al. 2020: plain "
        "likelihoods and reconstruction errors call blurred or flat images MORE normal); bpd = rec_bpd + kl_bpd, "
        "the negative ELBO in bits per dimension (3*H*W) under a discretized Gaussian decoder on 8-bit pixels "
        "with fixed --sigma, from one posterior sample (fixed --seed), KL to N(0, I) in closed form; mse and l1 "
        "of the posterior-mean reconstruction (pixels in [0, 1]); lpips when torchvision's vgg16 weights are "
        "present. Unreadable files are listed in the CSV and on stderr.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("data", metavar="DATA", help="an image file or a folder of images (searched recursively)")
    p.add_argument("--output", required=True, metavar="CSV", help="output CSV, e.g. scores.csv")
    p.add_argument("--size", type=positive_int, default=None, metavar="N",
                   help="resize the short side to N and centre-crop NxN (default: full size cropped to a multiple of 8)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="images per forward pass (same-size runs; default 8)")
    p.add_argument("--sort", choices=SORT_KEYS, default="score", help="column to sort by, worst first (default: score)")
    p.add_argument("--sigma", type=positive_float, default=DEFAULT_SIGMA, metavar="S",
                   help=f"decoder Gaussian sigma, pixels in [-1, 1] (default {DEFAULT_SIGMA}: PSNR ~26 dB). Set it to the "
                   "model's RMS reconstruction error: sigma = 2 * 10^(-PSNR/20) with PSNR from `kl-autoencoder eval`")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior sample (default 0)")
    p.add_argument("--samples", type=non_negative_int, default=1, help="posterior samples averaged in rec_bpd (0: posterior mean; default 1)")
    p.add_argument("--lpips-weights", default=None, metavar="FILE", help="torchvision vgg16-397923af.pth (default: $TORCH_HOME/hub/checkpoints/)")
    add_runtime_args(p)
    add_force_arg(p)
    common.add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, args.force, folder=False)  # before any work
    vae = common.resolve_model(args.model, **runtime_kwargs(args), **common.model_kwargs(args))
    files = find_images(args.data)
    if not files:
        raise CLIError(f"{args.data}: no images found (extensions: jpg, png, webp, bmp, tif)")
    out = Path(args.output)
    with output_lock(out.parent, "score", name=f".{out.name}.lock"):  # one job per output file
        report = score_images(vae, files, size=args.size, batch_size=args.batch_size, sigma=args.sigma, seed=args.seed,
                              samples=args.samples, lpips_weights=args.lpips_weights)
        if not report.lpips["available"]:
            log.info("lpips column unavailable: %s", report.lpips["reason"])
        write_csv(report, out, args.sort)
    rows = sort_rows(report.rows, args.sort)
    print(f"scored {len(rows)} image(s), {len(report.skipped)} skipped -> {out} (sorted by {args.sort}, worst first)")
    for r in rows[:3]:
        print(f"  {r['file']}: {args.sort} {r[args.sort]:.4g}")
    return 0 if rows else 1
