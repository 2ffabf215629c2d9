"""Building a VAE from a preset, and describing one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..config import Config, ModelConfig, load_config
from .layout import downsample_factor


def create(preset: str | Path | Config | ModelConfig = "sd-kl-f8", *, seed: int | None = None) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL from a preset name, YAML path or config; seeded, so repeatable."""
    if isinstance(preset, Config):
        mcfg = preset.model
    elif isinstance(preset, ModelConfig):
        mcfg = preset
    else:
        mcfg = load_config(preset).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mcfg.seed if seed is None else seed)
        vae = AutoencoderKL(**mcfg.diffusers_kwargs())
    return vae.eval()


def num_parameters(vae: nn.Module) -> int:
    return sum(p.numel() for p in vae.parameters())


def model_summary(vae: nn.Module) -> dict[str, Any]:
    """The architecture and latent normalisation of ``vae`` as plain values (for reports and cards)."""
    c = vae.config
    return {
        "parameters": num_parameters(vae),
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "latent_channels": c.latent_channels,
        "downsample_factor": downsample_factor(vae),
        "scaling_factor": c.scaling_factor,
        "shift_factor": getattr(c, "shift_factor", None),
        "dtype": str(next(vae.parameters()).dtype).replace("torch.", ""),
    }
