"""Validation during training: reconstruction of fixed held-out centre crops (``data.val_dir``)."""

from __future__ import annotations

import torch

from ..config import Config
from ..evaluation.metrics import psnr
from ..inference import reconstruct
from .data import ImageFolder


def validation_set(cfg: Config) -> torch.Tensor | None:
    """The first ``data.val_images`` images of ``data.val_dir``, centre-cropped: (n, 3, crop, crop) in [-1, 1]."""
    if not cfg.data.val_dir:
        return None
    ds = ImageFolder(cfg.data.val_dir, cfg.data.crop_size, train=False, small_images="upscale", min_size=cfg.data.min_size)
    n = min(cfg.data.val_images, len(ds))
    return torch.stack([ds[i]["pixels"] for i in range(n)])


@torch.no_grad()
def validate(vae: torch.nn.Module, val: torch.Tensor, step: int) -> dict[str, float]:
    """L1 (images in [-1, 1]) and PSNR (dB, uint8) of ``vae``'s reconstructions of ``val``, in eval mode."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    rec = torch.cat([reconstruct(vae, val[i : i + 8].to(device)).cpu() for i in range(0, len(val), 8)])
    vae.train(was_training)
    return {"step": step, "l1": float((rec - val).abs().mean()), "psnr": psnr(val, rec)}
