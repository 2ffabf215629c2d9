"""Pixel metrics for reconstructions: PSNR, SSIM, baselines and compression figures.

All of them work on uint8 RGB images, i.e. on what a user saves to disk, so two tools that quantise
alike agree. SSIM comes from torchmetrics (11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, data
range 255 -- Wang et al. 2004, as scikit-image's ``structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)``). LPIPS: ``lpips.py``; rFID: ``fid.py``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image


def _chw(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None].to(dtype)  # (1, 3, H, W) in [0, 255]


def _as_uint8_values(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (arrays or tensors), or float tensors in [-1, 1] (quantised as ``to_uint8`` does) -> float64."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    if x.dtype == torch.uint8:
        return x.double()
    return ((x.detach().double().cpu().clamp(-1, 1) + 1) * 127.5).round()


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB (peak 255) over all pixels of ``a`` and ``b``; inf when identical.

    Inputs: uint8 arrays/tensors, or float tensors in [-1, 1] (image batches), compared after quantising
    to 8 bits as a saved image would be. For a batch this is the PSNR of the mean squared error over the
    whole batch (``eval`` averages per-image PSNRs instead).
    """
    qa, qb = _as_uint8_values(a), _as_uint8_values(b)
    if qa.shape != qb.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(qa.shape)} vs {tuple(qb.shape)}")
    mse = float(((qa - qb) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 RGB images (H, W, 3), peak 255; inf when identical."""
    return psnr(a, b)


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Gaussian window 11, sigma 1.5, data range 255, mean over RGB) of two uint8 images (H, W, 3)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    # float32: 10x faster than float64 (oneDNN convs); agrees with float64 to ~1e-5 on 0..255 images
    _, full = structural_similarity_index_measure(
        _chw(a, torch.float32), _chw(b, torch.float32), data_range=255.0, return_full_image=True
    )  # (1, 3, H, W) SSIM map over reflect-padded input
    # Wang et al.'s reference code (and scikit-image) average only where the 11x11 window fits
    # inside the image; torchmetrics averages the padded border too. Crop the 5-pixel border.
    r = (11 - 1) // 2
    return float(full[..., r:-r, r:-r].double().mean()) if min(a.shape[:2]) > 2 * r else float(full.double().mean())


def bicubic_baseline(img: Image.Image, factor: int) -> Image.Image:
    """PIL bicubic downsample by ``factor`` then bicubic upsample back (size must divide by ``factor``)."""
    w, h = img.size
    small = img.resize((w // factor, h // factor), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)


def encoded_size(img: Image.Image, fmt: str, **kwargs: Any) -> tuple[int, Image.Image]:
    """Bytes of ``img`` saved as ``fmt`` (PNG, JPEG) in memory, and the decoded image."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    n = buf.tell()
    buf.seek(0)
    return n, Image.open(buf).convert("RGB")


def latent_bits_per_pixel(latent_shape: tuple[int, ...], image_hw: tuple[int, int], bits: int = 16) -> float:
    """Bits per image pixel of a (C, h, w) latent stored at ``bits`` bits per value."""
    return math.prod(latent_shape[-3:]) * bits / (image_hw[0] * image_hw[1])
