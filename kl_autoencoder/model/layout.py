"""What a VAE's config says about its latent space: downsample factor and channels."""

from __future__ import annotations

from typing import Any

from torch import nn


def downsample_factor(vae_or_config: nn.Module | Any) -> int:
    """Image pixels per latent element along each side: 2 ** (levels - 1), 8 for every SD-family VAE."""
    config = getattr(vae_or_config, "config", vae_or_config)
    return 2 ** (len(config.block_out_channels) - 1)
