"""Colour fidelity of a diffusers AutoencoderKL folder, measured with plain diffusers + PIL + numpy.

Issue 18: the shipped model moved the mean of each colour channel by up to 21 levels of 255. This
prints, for a model folder, per image: PSNR, bicubic-by-8 PSNR and the per-channel mean error
(reconstruction mean - original mean, in levels of 255) on
  - the bundled demo photos at 256 px (short side resized to 256, centre crop: what `demo` does),
  - Kodak full images (centre-cropped to a multiple of 8), when --kodak is given,
  - 128 px crops (the demo photos resized to 128 + the centre 128 px of every Kodak image),
  - flat solid-colour images (64 and 256 px).
No kl_autoencoder code is in the measured path (only the list of bundled photos).

    python tools/colour_check.py weights/kl-f8c4-bsds-urban-cpu --kodak ../shared/data/kodak --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load(path: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32).eval()


@torch.no_grad()
def reconstruct(vae, a: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3) through the posterior mean."""
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def square(im: Image.Image, size: int) -> Image.Image:
    s = size / min(im.size)
    w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
    im = im.resize((w, h), Image.BICUBIC, reducing_gap=None)
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def crop8(im: Image.Image) -> Image.Image:
    w, h = im.width - im.width % 8, im.height - im.height % 8
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def bicubic8(im: Image.Image) -> np.ndarray:
    small = im.resize((im.width // 8, im.height // 8), Image.BICUBIC)
    return np.asarray(small.resize(im.size, Image.BICUBIC))


def row(vae, name: str, im: Image.Image) -> dict:
    a = np.asarray(im.convert("RGB"))
    rec = reconstruct(vae, a)
    d = rec.reshape(-1, 3).astype(np.float64).mean(0) - a.reshape(-1, 3).astype(np.float64).mean(0)
    return {"image": name, "size": f"{im.width}x{im.height}", "psnr": psnr(a, rec), "psnr_bicubic_f8": psnr(a, bicubic8(im)),
            "mean_error": [round(float(v), 2) for v in d], "max_abs_mean_error": float(np.abs(d).max())}


def summary(rows: list[dict]) -> dict:
    d = np.array([r["mean_error"] for r in rows])
    return {"n": len(rows), "psnr": float(np.mean([r["psnr"] for r in rows])),
            "psnr_bicubic_f8": float(np.mean([r["psnr_bicubic_f8"] for r in rows])),
            "max_abs_mean_error": float(np.abs(d).max()), "mean_signed_error": [round(float(v), 2) for v in d.mean(0)],
            "mean_abs_error": float(np.abs(d).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--kodak", default=None, help="folder of Kodak PNGs (full images and their centre 128 px)")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--quiet", action="store_true", help="only the summaries")
    a = ap.parse_args()
    from kl_autoencoder.samples import sample_paths

    vae = load(a.model)
    sets: dict[str, list[dict]] = {"demo-256": [], "crops-128": [], "kodak": [], "flat": []}
    for p in sample_paths():
        im = Image.open(p).convert("RGB")
        sets["demo-256"].append(row(vae, p.name, square(im, 256)))
        sets["crops-128"].append(row(vae, p.name, square(im, 128)))
    if a.kodak:
        for p in sorted(Path(a.kodak).glob("*.png")):
            im = Image.open(p).convert("RGB")
            sets["kodak"].append(row(vae, p.name, crop8(im)))
            c = crop8(im)
            left, top = (c.width - 128) // 2, (c.height - 128) // 2
            sets["crops-128"].append(row(vae, p.name + "@centre128", c.crop((left, top, left + 128, top + 128))))
    for size in (64, 256):
        for name, rgb in {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "grey": (128, 128, 128),
                          "skin": (224, 172, 140), "sky": (110, 160, 220)}.items():
            r = row(vae, f"{name}@{size}", Image.new("RGB", (size, size), rgb))
            r["psnr"] = min(r["psnr"], 99.0)
            sets["flat"].append(r)
    out = {k: {"summary": summary(v), "rows": v} for k, v in sets.items() if v}
    for k, v in out.items():
        if not a.quiet:
            for r in v["rows"]:
                print(f"  {k:9s} {r['image']:22s} {r['size']:>8s}  PSNR {r['psnr']:6.2f}  bicubic-f8 {r['psnr_bicubic_f8']:6.2f}"
                      f"  mean error RGB {r['mean_error']}")
        s = v["summary"]
        print(f"{k:9s} n={s['n']:3d}  PSNR {s['psnr']:6.2f}  bicubic-f8 {s['psnr_bicubic_f8']:6.2f}  max |mean error| "
              f"{s['max_abs_mean_error']:5.2f}  mean |error| {s['mean_abs_error']:5.2f}  average signed error {s['mean_signed_error']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
