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

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import api, metrics
from .images import ImageError, find_images, load_image, pil_to_tensor, save_grid, tensor_to_uint8


def prepare(img: Image.Image, size: int | None, multiple: int = 8) -> Image.Image:
    """``size``: short side -> size (antialiased bicubic), centre crop size x size; None: centre crop to a multiple."""
    if size is not None:
        s = size / min(img.size)
        w, h = max(size, round(img.width * s)), max(size, round(img.height * s))
        img = img.resize((w, h), Image.BICUBIC, reducing_gap=None)  # PIL's resize is antialiased when shrinking
        cw = ch = size
    else:
        cw, ch = img.width - img.width % multiple, img.height - img.height % multiple
        if cw == 0 or ch == 0:
            raise ImageError(f"{img.width}x{img.height} is smaller than {multiple} pixels on a side")
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


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
    from tqdm import tqdm

    files = find_images(data)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"{data}: no images found (extensions: jpg, png, webp, bmp, tif)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    lpips_fn, lpips_info = metrics.make_lpips(lpips_weights)
    fid, fid_info = metrics.make_fid(inception_weights)
    f = api.downsample_factor(vae)
    kw = {"tiling": tiling, "tile_size": tile_size}

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    grid: list[list[Image.Image]] = []
    lat_sum = lat_sq = 0.0
    lat_n = 0
    bar = tqdm(files, desc="eval", unit="img", disable=not progress)
    for path in bar:
        try:
            crop = prepare(load_image(path), size, f)
        except ImageError as e:
            skipped.append(str(e) if str(e).startswith(str(path)) else f"{path}: {e}")
            tqdm.write(f"warning: skipped {skipped[-1]}", file=sys.stderr)
            continue
        orig = np.asarray(crop)  # (H, W, 3) uint8
        x = pil_to_tensor(crop)[None]  # (1, 3, H, W) in [-1, 1]
        mean, _ = api.encode_moments(vae, x, **kw)  # (1, C, H/f, W/f) raw posterior mean
        latents = api.normalize_latents(vae, mean)
        rec = tensor_to_uint8(api.decode(vae, latents, **kw))[0]  # (H, W, 3) uint8
        z = mean.double()
        lat_sum, lat_sq, lat_n = lat_sum + float(z.sum()), lat_sq + float((z * z).sum()), lat_n + z.numel()
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
            pixels = crop.width * crop.height
            row["latent_bpp_fp16"] = metrics.latent_bits_per_pixel(tuple(latents.shape), (crop.height, crop.width), 16)
            for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                r = tensor_to_uint8(api.decode(vae, latents.to(dt).float(), **kw))[0]
                row[f"psnr_latent_{name}"] = metrics.psnr_uint8(orig, r)
            with Image.open(path) as src:
                row["source_bpp"] = path.stat().st_size * 8 / (src.width * src.height)
            n_png, _ = metrics.encoded_size(crop, "PNG")
            n_jpg, jpg = metrics.encoded_size(crop, "JPEG", quality=90)
            row["png_bpp"] = n_png * 8 / pixels
            row["jpeg90_bpp"] = n_jpg * 8 / pixels
            row["jpeg90_psnr"] = metrics.psnr_uint8(orig, np.asarray(jpg))
        if fid is not None:
            fid.update(orig, rec)
        rows.append(row)
        if len(grid) < grid_images:
            grid.append([_thumb(crop), _thumb(Image.fromarray(rec)), _thumb(error_heatmap(orig, rec))])
        bar.set_postfix(psnr=f"{_mean([r['psnr'] for r in rows if math.isfinite(r['psnr'])]) or 0:.2f}")

    report = _report(vae, data, size, rows, skipped, lpips_info, fid_info, fid, (lat_sum, lat_sq, lat_n), compression)
    api.save_json(report, out / "metrics.json")
    (out / "metrics.md").write_text(to_markdown(report))
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
            "model": api.model_summary(vae),
        },
        skipped=skipped,
        per_image=rows,
    )
    return report


def _fmt(v: Any, digits: int = 2) -> str:
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
        f"| **VAE reconstruction** | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | {_fmt(r['lpips'], 4)} | "
        f"{_fmt(r.get('latent_bpp_fp16'))} (fp16 latents) |",
    ]
    if "psnr_latent_fp16" in r:
        lines += [
            f"| VAE, latents stored as fp16 | {_fmt(r['psnr_latent_fp16'])} | | | {_fmt(r['latent_bpp_fp16'])} |",
            f"| VAE, latents stored as bf16 | {_fmt(r['psnr_latent_bf16'])} | | | {_fmt(r['latent_bpp_bf16'])} |",
        ]
    for k in (8, 4):
        lines.append(
            f"| bicubic down/up x{k} | {_fmt(r[f'psnr_bicubic_f{k}'])} | {_fmt(r[f'ssim_bicubic_f{k}'], 4)} | "
            f"{_fmt(r[f'lpips_bicubic_f{k}'], 4)} | |"
        )
    if "png_bpp" in r:
        lines += [
            f"| PNG (lossless) | inf | 1.0000 | 0 | {_fmt(r['png_bpp'])} |",
            f"| JPEG quality 90 | {_fmt(r['jpeg90_psnr'])} | | | {_fmt(r['jpeg90_bpp'])} |",
            f"| source files | | | | {_fmt(r['source_bpp'])} |",
        ]
    ls = r["latent_stats"]
    lines += [
        "",
        f"rFID: {_fmt(r['rfid'])}" + ("" if r["availability"]["rfid"]["available"] else " (unavailable)"),
        "",
        "## Latent statistics",
        "",
        f"mean {_fmt(ls['mean'], 4)}, std {_fmt(ls['std'], 4)}; suggested scaling_factor {_fmt(ls['suggested_scaling_factor'], 5)}"
        f" (shift 0), or shift_factor {_fmt(ls['suggested_shift_factor'], 4)} with the same scale.",
    ]
    missing = [v["reason"] for v in r["availability"].values() if not v["available"]]
    if missing:
        lines += ["", "## Unavailable metrics", ""] + [f"- {m}" for m in missing]
    if r["skipped"]:
        lines += ["", "## Skipped files", ""] + [f"- {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


def cmd_eval(args: argparse.Namespace) -> int:
    from .cli import resolve_model, tiling_kwargs

    vae = resolve_model(args.model)
    r = evaluate(
        vae, args.data, args.output, size=args.size, limit=args.limit, lpips_weights=args.lpips_weights,
        inception_weights=args.inception_weights, compression=not args.no_compression, **tiling_kwargs(args),
    )
    print(
        f"{r['n_images']} images: PSNR {_fmt(r['psnr'])} dB, SSIM {_fmt(r['ssim'], 4)} "
        f"(bicubic x8 {_fmt(r['psnr_bicubic_f8'])} dB, x4 {_fmt(r['psnr_bicubic_f4'])} dB) -> {args.output}/metrics.json"
    )
    for v in r["availability"].values():
        if not v["available"]:
            print(f"note: {v['reason']}", file=sys.stderr)
    if r["skipped"]:
        print(f"note: {len(r['skipped'])} file(s) skipped, listed in metrics.json", file=sys.stderr)
    return 0 if r["n_images"] else 1


def register_cli(sub: argparse._SubParsersAction) -> None:
    from .cli import MODEL_HELP, add_tiling_args

    p = sub.add_parser(
        "eval",
        help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID) beside bicubic, PNG and JPEG baselines",
        description="Reconstruct the images in DATA and write DIR/metrics.json, DIR/metrics.md and DIR/grid.png "
        "(original | reconstruction | error heatmap). PSNR and SSIM on uint8 RGB; LPIPS and rFID when their "
        "weight files are present (otherwise reported unavailable with the file to provide); bicubic x8/x4 "
        "baselines, PNG/JPEG-90 bits per pixel and latent statistics on the same crops.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP + " (default: the shipped model)")
    p.add_argument("data", metavar="DATA", help="an image file or a folder of images (searched recursively)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for metrics.json, metrics.md, grid.png")
    p.add_argument("--size", type=int, default=None, metavar="N",
                   help="resize the short side to N (bicubic) and centre-crop NxN; default: full size cropped to a multiple of 8")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="only the first K images (sorted by path)")
    p.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help=f"torchvision {metrics.LPIPS_BACKBONE_FILES['vgg']} (default: $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help=f"torch-fidelity {metrics.INCEPTION_FILE} (default: $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--no-compression", action="store_true",
                   help="skip the compression figures (saves two decodes per image: fp16/bf16-rounded latents)")
    add_tiling_args(p)
    p.set_defaults(func=cmd_eval)
