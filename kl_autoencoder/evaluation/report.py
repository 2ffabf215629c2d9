"""The evaluation report: reconstruction metrics beside simple baselines and compression figures.

``evaluate(vae, data, output)`` (CLI: ``kl-autoencoder eval MODEL DATA --output DIR``) reconstructs
every image (posterior mean, no sampling) and writes

- ``metrics.json``: top-level ``psnr``, ``ssim``, ``psnr_bicubic_f8``, ``psnr_bicubic_f4``, ``n_images``,
  ``lpips``/``rfid`` (null when unavailable, with the reason under ``availability``), compression
  figures (``latent_bpp_fp16``, ``png_bpp``, ``jpeg90_bpp``, ``jpeg90_psnr``, ...), latent statistics
  and per-image rows;
- ``metrics.md``: the same as a table;
- ``grid.png``: original | reconstruction | error heatmap for the first few images.

Images: with ``size=N`` the short side is resized to N (antialiased bicubic) then centre-cropped to
NxN, as VAE papers evaluate at 256; without it the full image is centre-cropped to a multiple of 8.
PSNR/SSIM/LPIPS are means of per-image values on uint8 RGB. Unreadable files are listed, not fatal.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..inference import decode, encode_moments
from ..model import model_summary, normalize_latents, size_multiple
from ..utils.files import save_json, write_text
from ..utils.images import (
    ImageError,
    find_images,
    fit_crop,
    load_image,
    pil_to_tensor,
    save_grid,
    tensor_to_uint8,
)
from ..utils.locks import output_lock
from . import metrics
from .fid import make_fid
from .lpips import make_lpips


def error_heatmap(a: np.ndarray, b: np.ndarray, gain: float = 4.0) -> Image.Image:
    """|a - b| averaged over RGB, times ``gain``, on a black-red-yellow-white ramp (white: error >= 255/gain)."""
    err = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=2)  # (H, W) in [0, 255]
    v = np.clip(err * gain / 255.0, 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def _thumb(img: Image.Image, height: int = 256) -> Image.Image:
    if img.height <= height:
        return img
    return img.resize((max(1, round(img.width * height / img.height)), height), Image.BICUBIC)


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _measure(vae: torch.nn.Module, path: Path, crop: Image.Image, lpips_fn: Any, kw: dict, compression: bool
             ) -> tuple[dict[str, Any], np.ndarray, torch.Tensor]:
    """One image: (its metrics row, the reconstruction (H, W, 3) uint8, the raw posterior mean)."""
    orig = np.asarray(crop)  # (H, W, 3) uint8
    x = pil_to_tensor(crop)[None]  # (1, 3, H, W) in [-1, 1]
    mean, _ = encode_moments(vae, x, **kw)  # (1, C, H/f, W/f) raw posterior mean
    latents = normalize_latents(vae, mean)
    rec = tensor_to_uint8(decode(vae, latents, **kw))[0]  # (H, W, 3) uint8
    row: dict[str, Any] = {
        "file": str(path),
        "width": crop.width,
        "height": crop.height,
        "psnr": metrics.psnr_uint8(orig, rec),
        "ssim": metrics.ssim_uint8(orig, rec),
        "lpips": lpips_fn(orig, rec) if lpips_fn else None,
    }
    for k in (8, 4):
        base = np.asarray(metrics.bicubic_baseline(crop, k))
        row[f"psnr_bicubic_f{k}"] = metrics.psnr_uint8(orig, base)
        row[f"ssim_bicubic_f{k}"] = metrics.ssim_uint8(orig, base)
        row[f"lpips_bicubic_f{k}"] = lpips_fn(orig, base) if lpips_fn else None
    if compression:
        row.update(_compression(vae, path, crop, orig, latents, kw))
    return row, rec, mean


def _compression(vae: torch.nn.Module, path: Path, crop: Image.Image, orig: np.ndarray, latents: torch.Tensor,
                 kw: dict) -> dict[str, float]:
    """Bits per pixel of the latent, PNG and JPEG-90, and PSNR with the latents stored in 16 bits."""
    pixels = crop.width * crop.height
    row = {"latent_bpp_fp16": metrics.latent_bits_per_pixel(tuple(latents.shape), (crop.height, crop.width), 16)}
    for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        r = tensor_to_uint8(decode(vae, latents.to(dt).float(), **kw))[0]
        row[f"psnr_latent_{name}"] = metrics.psnr_uint8(orig, r)
    with Image.open(path) as src:
        row["source_bpp"] = path.stat().st_size * 8 / (src.width * src.height)
    n_png, _ = metrics.encoded_size(crop, "PNG")
    n_jpg, jpg = metrics.encoded_size(crop, "JPEG", quality=90)
    row["png_bpp"] = n_png * 8 / pixels
    row["jpeg90_bpp"] = n_jpg * 8 / pixels
    row["jpeg90_psnr"] = metrics.psnr_uint8(orig, np.asarray(jpg))
    return row


@torch.no_grad()
def evaluate(
    vae: torch.nn.Module,
    data: str | Path,
    output: str | Path,
    *,
    size: int | None = None,
    limit: int | None = None,
    lpips_weights: str | Path | None = None,
    inception_weights: str | Path | None = None,
    compression: bool = True,
    grid_images: int = 4,
    tiling: str = "auto",
    tile_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``vae`` on the images under ``data``; write metrics.json, metrics.md, grid.png to ``output``.

    ``compression``: also decode the latents rounded to fp16 and bf16 (two more decodes per image).
    Returns the metrics.json content.
    """
    files = find_images(data)[:limit]
    if not files:
        raise FileNotFoundError(f"{data}: no images found (extensions: jpg, png, webp, bmp, tif)")
    out = Path(output)
    with output_lock(out, "eval"):  # one job per output folder
        return _evaluate(vae, data, out, files, size, lpips_weights, inception_weights, compression, grid_images,
                         {"tiling": tiling, "tile_size": tile_size}, progress)


def _evaluate(vae: torch.nn.Module, data: str | Path, out: Path, files: list[Path], size: int | None,
              lpips_weights: str | Path | None, inception_weights: str | Path | None, compression: bool, grid_images: int,
              kw: dict, progress: bool) -> dict[str, Any]:
    """evaluate()'s loop over the images and its three outputs."""
    from tqdm import tqdm

    lpips_fn, lpips_info = make_lpips(lpips_weights)
    fid, fid_info = make_fid(inception_weights)
    f = size_multiple(vae)  # 8; 16 for FLUX.2 (2x2 latent patches)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    grid: list[list[Image.Image]] = []
    lat = [0.0, 0.0, 0]  # sum, sum of squares, count of raw latent values
    bar = tqdm(files, desc="eval", unit="img", disable=not progress)
    for path in bar:
        try:
            crop = fit_crop(load_image(path), size, f)
        except ImageError as e:
            skipped.append(str(e) if str(e).startswith(str(path)) else f"{path}: {e}")
            tqdm.write(f"warning: skipped {skipped[-1]}", file=sys.stderr)
            continue
        row, rec, mean = _measure(vae, path, crop, lpips_fn, kw, compression)
        z = mean.double()
        lat = [lat[0] + float(z.sum()), lat[1] + float((z * z).sum()), lat[2] + z.numel()]
        if fid is not None:
            fid.update(np.asarray(crop), rec)
        rows.append(row)
        if len(grid) < grid_images:
            grid.append([_thumb(crop), _thumb(Image.fromarray(rec)), _thumb(error_heatmap(np.asarray(crop), rec))])
        bar.set_postfix(psnr=f"{_mean([r['psnr'] for r in rows if math.isfinite(r['psnr'])]) or 0:.2f}")

    report = _report(vae, data, size, rows, skipped, lpips_info, fid_info, fid, tuple(lat), compression)
    save_json(report, out / "metrics.json")
    write_text(out / "metrics.md", to_markdown(report))
    if grid:
        save_grid(grid, out / "grid.png")
    return report


def _report(vae, data, size, rows, skipped, lpips_info, fid_info, fid, lat, compression) -> dict[str, Any]:
    def col(key: str) -> float | None:
        return _mean([r.get(key) for r in rows]) if rows else None

    s, sq, n = lat
    lat_mean = s / n if n else None
    lat_std = math.sqrt(max(sq / n - lat_mean**2, 0.0)) if n else None
    report: dict[str, Any] = {
        "n_images": len(rows),
        "psnr": col("psnr"),
        "ssim": col("ssim"),
        "lpips": col("lpips") if lpips_info["available"] else None,
        "rfid": fid.compute() if fid is not None and rows else None,
        "psnr_bicubic_f8": col("psnr_bicubic_f8"),
        "psnr_bicubic_f4": col("psnr_bicubic_f4"),
        "ssim_bicubic_f8": col("ssim_bicubic_f8"),
        "ssim_bicubic_f4": col("ssim_bicubic_f4"),
        "lpips_bicubic_f8": col("lpips_bicubic_f8") if lpips_info["available"] else None,
        "lpips_bicubic_f4": col("lpips_bicubic_f4") if lpips_info["available"] else None,
    }
    if compression:
        report.update(
            latent_bpp_fp16=col("latent_bpp_fp16"),
            latent_bpp_bf16=col("latent_bpp_fp16"),  # 16 bits per value either way
            psnr_latent_fp16=col("psnr_latent_fp16"),
            psnr_latent_bf16=col("psnr_latent_bf16"),
            source_bpp=col("source_bpp"),
            png_bpp=col("png_bpp"),
            jpeg90_bpp=col("jpeg90_bpp"),
            jpeg90_psnr=col("jpeg90_psnr"),
        )
    report.update(
        latent_stats={
            "mean": lat_mean,
            "std": lat_std,
            "suggested_scaling_factor": 1.0 / lat_std if lat_std else None,
            "suggested_shift_factor": lat_mean,
            "note": "over the raw posterior means of these images; SD layout: scale = 1/std, SD3 layout: shift = mean, scale = 1/std",
        },
        availability={"lpips": lpips_info, "rfid": fid_info},
        settings={
            "data": str(data),
            "size": size,
            "crop": f"short side -> {size}, centre crop" if size else "centre crop to a multiple of 8",
            "metrics": "means of per-image values on uint8 RGB; PSNR peak 255; SSIM gaussian 11x11 sigma 1.5 (torchmetrics)",
            "model": model_summary(vae),
        },
        skipped=skipped,
        per_image=rows,
        notes=_notes(rows),
    )
    return report


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """What a reader of metrics.json must know about its null values (JSON has no Infinity)."""
    exact = [r["file"] for r in rows if any(isinstance(v, float) and math.isinf(v) for v in r.values())]
    if not exact:
        return []
    return [f"{len(exact)} of {len(rows)} image(s) came back exactly (infinite PSNR, written as null; the mean "
            f"PSNR is then infinite, also null): {', '.join(exact[:5])}"]


def format_value(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def to_markdown(r: dict[str, Any]) -> str:
    """The report as Markdown: one table of methods, then latent statistics, availability, skipped files."""
    lines = [
        f"# Evaluation: {r['settings']['data']}",
        "",
        f"{r['n_images']} images, {r['settings']['crop']}; {r['settings']['metrics']}.",
        "",
        "| method | PSNR (dB) | SSIM | LPIPS | bits/pixel |",
        "|---|---|---|---|---|",
        f"| **VAE reconstruction** | {format_value(r['psnr'])} | {format_value(r['ssim'], 4)} | {format_value(r['lpips'], 4)} | "
        f"{format_value(r.get('latent_bpp_fp16'))} (fp16 latents) |",
    ]
    if "psnr_latent_fp16" in r:
        lines += [
            f"| VAE, latents stored as fp16 | {format_value(r['psnr_latent_fp16'])} | | | {format_value(r['latent_bpp_fp16'])} |",
            f"| VAE, latents stored as bf16 | {format_value(r['psnr_latent_bf16'])} | | | {format_value(r['latent_bpp_bf16'])} |",
        ]
    for k in (8, 4):
        lines.append(
            f"| bicubic down/up x{k} | {format_value(r[f'psnr_bicubic_f{k}'])} | {format_value(r[f'ssim_bicubic_f{k}'], 4)} | "
            f"{format_value(r[f'lpips_bicubic_f{k}'], 4)} | |"
        )
    if "png_bpp" in r:
        lines += [
            f"| PNG (lossless) | inf | 1.0000 | 0 | {format_value(r['png_bpp'])} |",
            f"| JPEG quality 90 | {format_value(r['jpeg90_psnr'])} | | | {format_value(r['jpeg90_bpp'])} |",
            f"| source files | | | | {format_value(r['source_bpp'])} |",
        ]
    ls = r["latent_stats"]
    lines += [
        "",
        f"rFID: {format_value(r['rfid'])}" + ("" if r["availability"]["rfid"]["available"] else " (unavailable)"),
        "",
        "## Latent statistics",
        "",
        f"mean {format_value(ls['mean'], 4)}, std {format_value(ls['std'], 4)}; suggested scaling_factor {format_value(ls['suggested_scaling_factor'], 5)}"
        f" (shift 0), or shift_factor {format_value(ls['suggested_shift_factor'], 4)} with the same scale.",
    ]
    missing = [v["reason"] for v in r["availability"].values() if not v["available"]]
    if missing:
        lines += ["", "## Unavailable metrics", ""] + [f"- {m}" for m in missing]
    if r["skipped"]:
        lines += ["", "## Skipped files", ""] + [f"- {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"
