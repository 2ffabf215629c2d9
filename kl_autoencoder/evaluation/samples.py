"""Test images for the checks that measure a VAE (swap compatibility, half precision): made in code, or read."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from ..utils.images import ImageError, find_images, fit_crop, load_image, pil_to_tensor

log = logging.getLogger("kl_autoencoder")



def synthetic_images(n: int = 4, size: int = 128, seed: int = 0) -> torch.Tensor:
    """``n`` natural-looking test images, (n, 3, size, size) in [-1, 1], made in code (no files needed).

    Natural images have a ~1/f amplitude spectrum, smooth shading and sharp edges; each image mixes a
    1/f colour field, a lit gradient, and a few hard-edged discs and bars, so both the low frequencies
    (colour) and edges (what a VAE decoder struggles with) are exercised.
    """
    with torch.device("cpu"):  # made in code on the CPU, whatever the caller's default device
        g = torch.Generator().manual_seed(seed)
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        f = torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / size)  # (size, size//2+1) cycles/pixel
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        out = []
        for _ in range(n):
            spec = torch.randn(3, size, size // 2 + 1, 2, generator=g)
            field = torch.fft.irfft2(torch.view_as_complex(spec) / f**1.4, s=(size, size))  # (3, size, size) 1/f noise
            field = field[:1] * 0.7 + field * 0.3  # correlated channels, like real colour
            field = (field - field.mean()) / (field.std() + 1e-8) * 0.35
            a = torch.rand(3, 1, 1, generator=g) * 2 - 1
            shade = a * (xx * math.cos(a[0].item() * 3) + yy * math.sin(a[1].item() * 3))  # (3, size, size)
            img = field + 0.5 * shade
            for _ in range(3):  # hard-edged discs and bars in flat colours
                cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.3])).tolist()
                mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < (r + 0.05) ** 2) if torch.rand(1, generator=g) < 0.5 else (abs(xx - cx) < r / 3) & (abs(yy - cy) < r + 0.05)
                img = torch.where(mask, torch.rand(3, 1, 1, generator=g) * 1.6 - 0.8, img)
            out.append(img.clamp(-1, 1))
        return torch.stack(out)


def load_sample_images(paths: Sequence[str | Path], size: int = 128) -> torch.Tensor:
    """Image files (or folders) -> (n, 3, size, size) in [-1, 1]: short side resized to ``size``, centre crop."""
    files = [f for p in paths for f in find_images(p)]
    batch = []
    for f in files:
        try:
            im = load_image(f)
        except ImageError as e:
            log.warning("skipped %s", e)
            continue
        batch.append(pil_to_tensor(fit_crop(im, size)))
    if not batch:
        raise InputError(f"no readable images in {', '.join(map(str, paths))}")
    return torch.stack(batch)
