"""Per-image anomaly scores from a VAE: reconstruction error, the negative ELBO in bits per dimension,
and that ELBO corrected for the image's own complexity.

``score_images(vae, images)`` (CLI: ``kl-autoencoder score MODEL DATA --output scores.csv``) gives, per image:

- ``mse``, ``l1``: reconstruction error of the posterior-mean reconstruction, pixels scaled to [0, 1];
- ``lpips``: LPIPS-vgg of the reconstruction when torchvision's vgg16 file is present (lpips.make_lpips);
- ``kl_bpd``: KL(q(z|x) || N(0, I)) in bits per pixel dimension, closed form on the raw latents;
- ``rec_bpd``: -log2 p(x|z) per dimension, z one posterior sample (fixed seed): the 1-sample ELBO estimate;
- ``bpd``: the negative ELBO in bits per dimension = rec_bpd + kl_bpd (dimensions: 3*H*W);
- ``png_bpd``: bits per dimension of the image saved as PNG (a generic lossless compressor);
- ``score`` (the default sort key): ``bpd - png_bpd``, the complexity-corrected likelihood of Serra et al.,
  "Input complexity and out-of-distribution detection with likelihood-based generative models", ICLR 2020.

Decoder likelihood: a discretized Gaussian on 8-bit pixels (Ho et al. 2020, DDPM, "discretized_gaussian_log_likelihood";
the PixelCNN++ construction): x in [-1, 1] takes 256 levels 2/255 apart; p(x|z) is the mass of
N(decoder(z), sigma^2) over the level's bin, the two edge bins reaching to -inf / +inf. That is a probability
of a discrete value, at most 1, so bits/dim are positive and finite (computed with log_ndtr, no clamping).
``sigma`` defaults to ``DEFAULT_SIGMA`` = 0.1 (12.75 of 255 levels): the RMS reconstruction error of a
small f8 VAE (PSNR 26 dB, ``sigma_from_psnr``), so the likelihood neither saturates on good reconstructions nor explodes on
ordinary ones. Plain reconstruction error or bits/dim rank blurred images as *more* normal (a blurred image
is easier to reconstruct); subtracting the PNG length removes that complexity bias (see ``score``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..inference import decode, encode_moments
from ..model import kl_divergence, normalize_latents, posterior, size_multiple
from ..utils.devices import seeded_randn
from ..utils.files import atomic_path, save_json
from ..utils.images import ImageError, as_image_batch, find_images, fit_crop, load_image, pil_to_tensor, tensor_to_pil, tensor_to_uint8
from .lpips import make_lpips

log = logging.getLogger("kl_autoencoder")

DEFAULT_SIGMA = 0.1
LN2 = math.log(2.0)
COLUMNS = ("score", "bpd", "rec_bpd", "kl_bpd", "png_bpd", "mse", "l1", "lpips")
SORT_KEYS = COLUMNS[:-1] + ("lpips",)


def kl_bits(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in bits, summed per sample: (B, C, h, w) -> (B,), float64."""
    return kl_divergence(mean.double(), logvar.double()) / LN2


def _log_diff_ndtr(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, accurate far in either tail (float64)."""
    upper = lo > 0  # both in the upper tail: use the mirror image Phi(-lo) - Phi(-hi), where log_ndtr is exact
    a = torch.where(upper, -lo, hi)
    b = torch.where(upper, -hi, lo)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)  # la > lb
    return la + torch.log1p(-torch.exp(lb - la))


def discretized_gaussian_bits(x: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log2 p(x | mu) summed per sample, (B, 3, H, W) -> (B,): 8-bit pixels x in [-1, 1], bins 2/255 wide.

    The edge bins extend to -inf (x = -1) and +inf (x = 1), so the 256 bin masses sum to 1.
    """
    x = x.double()
    inv = 1.0 / float(sigma)
    centred = x - mu.double()
    half = 1.0 / 255.0
    hi = torch.where(x >= 1.0 - 1e-6, torch.full_like(x, math.inf), (centred + half) * inv)
    lo = torch.where(x <= -1.0 + 1e-6, torch.full_like(x, -math.inf), (centred - half) * inv)
    logp = _log_diff_ndtr(hi, lo)  # (B, 3, H, W) nats, <= 0
    return -logp.flatten(1).sum(1) / LN2


@torch.no_grad()
def elbo_bits_per_dim(
    vae: torch.nn.Module,
    x: Any,
    *,
    sigma: float = DEFAULT_SIGMA,
    seed: int = 0,
    samples: int = 1,
) -> dict[str, torch.Tensor]:
    """The negative ELBO of images ``x`` (quantised to 8 bits, in [-1, 1]) in bits per dimension.

    Returns ``bpd``, ``rec_bpd``, ``kl_bpd`` (each (B,) float64) and ``recon`` (the posterior-mean
    reconstruction, (B, 3, H, W) float32, unclamped). ``rec_bpd`` averages ``samples`` posterior draws
    (torch.Generator seeded with ``seed``: repeatable); ``samples=0`` uses the posterior mean instead.
    Dimensions: 3*H*W. Sizes that are not multiples of 8 are padded for the VAE (inference.encode_moments) and cropped back.
    """
    device = next(vae.parameters()).device
    x = as_image_batch(x).to(device)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the 8-bit image the likelihood is over
    h, w = x.shape[-2:]
    mean, logvar = encode_moments(vae, x, tiling="never")  # raw (B, C, h/8, w/8), float32, on the model's device
    dims = 3 * h * w
    kl = kl_bits(mean, logvar) / dims
    recon = decode(vae, normalize_latents(vae, mean), tiling="never")[..., :h, :w]  # (B, 3, H, W)
    if samples == 0:
        rec = discretized_gaussian_bits(x, recon, sigma) / dims
    else:
        rec = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        for k in range(samples):
            # the same draw for every image, from a seeded CPU generator: a score depends on neither batch nor device
            eps = seeded_randn(tuple(mean.shape[1:]), seed + k, device).expand_as(mean)  # (B, C, h/8, w/8)
            z = posterior.sample(mean, logvar, eps)  # (B, C, h/8, w/8) raw posterior sample
            mu = decode(vae, normalize_latents(vae, z), tiling="never")[..., :h, :w]  # (B, 3, H, W)
            rec += discretized_gaussian_bits(x, mu, sigma) / dims / samples
    return {"bpd": (rec + kl).cpu(), "rec_bpd": rec.cpu(), "kl_bpd": kl.cpu(), "recon": recon.cpu()}


def png_bits_per_dim(img: Image.Image) -> float:
    """Bits per dimension (3 per pixel) of ``img`` saved as PNG (Pillow defaults): its complexity estimate."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.tell() * 8 / (3 * img.width * img.height)


def sigma_from_psnr(psnr_db: float) -> float:
    """The Gaussian sigma (pixels in [-1, 1]) equal to the RMS error of a reconstruction with this PSNR (peak 255)."""
    return 2.0 * 10 ** (-psnr_db / 20.0)


@dataclass
class ScoreReport:
    """``rows``: one dict per scored image (input order); ``skipped``: one line per unreadable input."""

    rows: list[dict[str, Any]]
    skipped: list[str]
    lpips: dict[str, Any]
    settings: dict[str, Any]


def _items(paths_or_images: Any, size: int | None, multiple: int) -> Iterable[tuple[str, Any]]:
    """(name, PIL image or (3, H, W) tensor, or an ImageError) for each input."""
    if isinstance(paths_or_images, (str, Path)):
        paths_or_images = find_images(paths_or_images)
    elif isinstance(paths_or_images, torch.Tensor):
        paths_or_images = list(as_image_batch(paths_or_images))
    for i, item in enumerate(paths_or_images):
        try:
            if isinstance(item, (str, Path)):
                yield str(item), fit_crop(load_image(item), size, multiple)
            elif isinstance(item, Image.Image):
                yield f"image{i}", fit_crop(item.convert("RGB"), size, multiple)
            else:
                x = as_image_batch(item)
                if x.shape[0] != 1:
                    raise InputError(f"image{i}: expected one image, got a batch of {x.shape[0]}")
                img = tensor_to_pil(x)[0]  # 8-bit: the likelihood is over 8-bit pixels
                yield f"image{i}", fit_crop(img, size, multiple) if size else img
        except ImageError as e:
            yield str(item) if isinstance(item, (str, Path)) else f"image{i}", e


def _row(name: str, img: Image.Image, x: torch.Tensor, rec: torch.Tensor, e: dict[str, torch.Tensor], k: int,
         lpips_fn: Any) -> dict[str, Any]:
    """The CSV row of image ``k`` of a scored batch: ``x``, ``rec`` (b, 3, H, W) in [-1, 1]."""
    png = png_bits_per_dim(img)
    err = (rec[k] - x[k]) / 2  # pixels in [0, 1]
    return {
        "file": name,
        "width": img.width,
        "height": img.height,
        "score": float(e["bpd"][k]) - png,
        "bpd": float(e["bpd"][k]),
        "rec_bpd": float(e["rec_bpd"][k]),
        "kl_bpd": float(e["kl_bpd"][k]),
        "png_bpd": png,
        "mse": float((err**2).mean()),
        "l1": float(err.abs().mean()),
        "lpips": lpips_fn(np.asarray(img), tensor_to_uint8(rec[k])) if lpips_fn else None,
    }


def _same_size_runs(good: list[tuple[str, Image.Image]], batch_size: int) -> Iterable[list[tuple[str, Image.Image]]]:
    """Consecutive images of one size, at most ``batch_size`` at a time."""
    i = 0
    while i < len(good):
        j = i + 1
        while j < len(good) and j - i < batch_size and good[j][1].size == good[i][1].size:
            j += 1
        yield good[i:j]
        i = j


@torch.no_grad()
def score_images(
    vae: torch.nn.Module,
    paths_or_images: Any,
    *,
    size: int | None = None,
    batch_size: int = 8,
    sigma: float = DEFAULT_SIGMA,
    seed: int = 0,
    samples: int = 1,
    lpips_weights: str | Path | None = None,
    progress: bool = True,
) -> ScoreReport:
    """Anomaly scores (see the module docstring) for each image; higher is more anomalous for every column.

    ``paths_or_images``: a folder or file (searched with images.find_images), or a list of paths, PIL images,
    uint8 arrays or [-1, 1] tensors, or one (B, 3, H, W) tensor. ``size=N``: short side -> N and centre crop
    NxN (as ``eval --size``); otherwise each image is centre-cropped to a multiple of 8. Consecutive images of
    one size are scored ``batch_size`` at a time. Unreadable files are listed in ``skipped``, not fatal.
    """
    from tqdm import tqdm

    if sigma <= 0:
        raise InputError(f"sigma must be positive (pixels in [-1, 1]), got {sigma}")
    lpips_fn, lpips_info = make_lpips(lpips_weights)
    good, skipped = [], []
    for name, img in _items(paths_or_images, size, size_multiple(vae)):
        if isinstance(img, Exception):
            skipped.append(str(img) if str(img).startswith(name) else f"{name}: {img}")
            print(f"warning: skipped {skipped[-1]}", file=sys.stderr)
        else:
            good.append((name, img))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(good), desc="score", unit="img", disable=not progress)
    for chunk in _same_size_runs(good, batch_size):
        x = torch.stack([pil_to_tensor(img) for _, img in chunk])  # (b, 3, H, W) in [-1, 1], 8-bit values
        e = elbo_bits_per_dim(vae, x, sigma=sigma, seed=seed, samples=samples)
        rec = e["recon"].clamp(-1, 1)
        rows += [_row(name, img, x, rec, e, k, lpips_fn) for k, (name, img) in enumerate(chunk)]
        bar.update(len(chunk))
    bar.close()
    settings = {"sigma": sigma, "seed": seed, "samples": samples, "size": size,
                "likelihood": f"discretized Gaussian on 8-bit pixels, sigma={sigma} (pixels in [-1, 1])"}
    return ScoreReport(rows, skipped, lpips_info, settings)


def sort_rows(rows: Sequence[dict[str, Any]], key: str = "score") -> list[dict[str, Any]]:
    """Worst (highest ``key``) first; rows without the value (LPIPS unavailable) keep their order at the end."""
    if key not in SORT_KEYS:
        raise InputError(f"sort key {key!r}: choose one of {', '.join(SORT_KEYS)}")
    have = [r for r in rows if r.get(key) is not None]
    return sorted(have, key=lambda r: -r[key]) + [r for r in rows if r.get(key) is None]


def write_csv(report: ScoreReport, path: str | Path, key: str = "score") -> Path:
    """Write the rows as a plain CSV (header first) sorted worst first, then one row per skipped file; the
    settings and notes go to a JSON sidecar (``scores.csv`` -> ``scores.json``). Returns the CSV's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["rank", "file", "width", "height", *COLUMNS, "error"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for rank, row in enumerate(sort_rows(report.rows, key), 1):
            w.writerow({**row, "rank": rank, "lpips": "" if row["lpips"] is None else row["lpips"]})
        for msg in report.skipped:
            name, _, reason = msg.partition(": ")
            w.writerow({"file": name, "error": reason or msg})
    notes = {
        "csv": path.name,
        "sorted_by": f"{key}, worst first; higher is more anomalous in every column",
        "decoder_likelihood": report.settings["likelihood"],
        "rec_bpd": f"from {report.settings['samples'] or 'the posterior mean, no'} posterior sample(s), seed {report.settings['seed']}",
        "score": "bpd - png_bpd (complexity-corrected likelihood, Serra et al. ICLR 2020); mse, l1 on pixels in [0, 1]",
        "lpips": report.lpips,
        "settings": report.settings,
        "skipped": report.skipped,
    }
    save_json(notes, sidecar_path(path))
    return path


def sidecar_path(csv_path: str | Path) -> Path:
    """The JSON file beside a scores CSV that holds its settings and notes."""
    p = Path(csv_path)
    return p.with_suffix(".json") if p.suffix.lower() == ".csv" else p.with_name(p.name + ".json")
