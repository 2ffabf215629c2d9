"""Latent normalisation: raw VAE latents ``z`` <-> what a diffusion model sees.

SD convention (diffusers/SD3): ``latents = (z - shift_factor) * scaling_factor``; ``shift_factor`` is
0 when the config has none (SD 1.x/2.x).
"""

from __future__ import annotations

import torch
from torch import nn


def _shift(vae: nn.Module) -> float:
    s = getattr(vae.config, "shift_factor", None)
    return 0.0 if s is None else float(s)


def normalize_latents(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Raw latents -> normalised ``(z - shift) * scale``."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def denormalize_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> raw ``latents / scale + shift``."""
    return latents / vae.config.scaling_factor + _shift(vae)
