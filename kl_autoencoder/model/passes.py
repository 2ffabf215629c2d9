"""The two halves of an AutoencoderKL as plain forward passes on raw tensors (no normalisation, no tiling)."""

from __future__ import annotations

import torch
from torch import nn


def encoder_moments(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> encoder output (B, 2C, H/8, W/8): ``quant_conv(encoder(x))``."""
    h = vae.encoder(x)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def decode_raw(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> images (B, 3, 8h, 8w), not clamped: ``decoder(post_quant_conv(z))``."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder(z)
