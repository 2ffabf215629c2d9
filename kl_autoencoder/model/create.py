"""Building a VAE from a preset, the diffusers classes a VAE may be, and describing one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from torch import nn

from ..config import Config, ModelConfig, load_config
from ..errors import InputError
from .layout import downsample_factor, normalized_channels
from .normalization import latent_normalization

# config.json ``_class_name`` -> class: SD 1.x/2.x, SDXL, Playground, SD3, FLUX.1 are AutoencoderKL; FLUX.2 has its own
VAE_CLASSES: dict[str, type] = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLFlux2": AutoencoderKLFlux2}


def vae_class(name: str, where: str = "config.json") -> type:
    """The diffusers class of a ``_class_name``; anything else is an InputError naming the supported ones."""
    if name not in VAE_CLASSES:
        raise InputError(f"{where}: _class_name {name!r} is not a supported VAE ({', '.join(VAE_CLASSES)})")
    return VAE_CLASSES[name]


def is_vae(obj: Any) -> bool:
    """True for an instance of one of ``VAE_CLASSES``."""
    return isinstance(obj, tuple(VAE_CLASSES.values()))


def create(preset: str | Path | Config | ModelConfig = "sd-kl-f8", *, seed: int | None = None) -> nn.Module:
    """A freshly initialised VAE (AutoencoderKL, or AutoencoderKLFlux2 when the preset says so) from a preset
    name, YAML path or config; seeded, so repeatable."""
    if isinstance(preset, Config):
        mcfg = preset.model
    elif isinstance(preset, ModelConfig):
        mcfg = preset
    else:
        mcfg = load_config(preset).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mcfg.seed if seed is None else seed)
        vae = vae_class(mcfg.architecture, "model.architecture")(**mcfg.diffusers_kwargs())
    return vae.eval()


def num_parameters(vae: nn.Module) -> int:
    return sum(p.numel() for p in vae.parameters())


def model_summary(vae: nn.Module) -> dict[str, Any]:
    """The architecture and latent normalisation of ``vae`` as plain values (for reports and cards)."""
    c = vae.config
    norm = latent_normalization(vae)
    return {
        "class": type(vae).__name__,
        "parameters": num_parameters(vae),
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "latent_channels": c.latent_channels,
        "normalized_channels": normalized_channels(vae),
        "downsample_factor": downsample_factor(vae),
        "scaling_factor": norm.scaling_factor if norm.kind != "batchnorm" else None,
        "shift_factor": norm.shift_factor,
        "latent_normalization": norm.describe(),
        "dtype": str(next(vae.parameters()).dtype).replace("torch.", ""),
    }
