"""Shared fixtures: tiny models with non-trivial weights and real sample photos (scikit-image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder.config import ModelConfig

# The smallest f8c4 AutoencoderKL that keeps the SD layout (quant convs, mid attention, 4 levels).
MICRO = ModelConfig(
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
    scaling_factor=0.5,
)


def perturb(vae: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Move weights away from init so GroupNorm affines, biases and attention are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0) + 0.01 * torch.randn(p.shape, generator=g))
    return vae


@pytest.fixture
def micro_vae() -> torch.nn.Module:
    return perturb(ka.create(MICRO))


@pytest.fixture
def micro_vae_c16() -> torch.nn.Module:
    cfg = ModelConfig(
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5, shift_factor=0.1, sample_size=64,
    )
    return perturb(ka.create(cfg))


def sample_photos(size: int | None = 64) -> list[Image.Image]:
    """Real photos shipped with scikit-image (no download), centre-cropped to size x size if given."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for a in photos:
        im = Image.fromarray(np.asarray(a)).convert("RGB")
        if size is not None:
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        out.append(im)
    return out


@pytest.fixture
def photos() -> list[Image.Image]:
    return sample_photos(64)
