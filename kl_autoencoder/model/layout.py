"""What a VAE's config says about its latent space: downsample factor, FLUX.2's latent patches, channels."""

from __future__ import annotations

from typing import Any

from torch import nn


def _config(vae_or_config: nn.Module | Any) -> Any:
    return getattr(vae_or_config, "config", vae_or_config)


def downsample_factor(vae_or_config: nn.Module | Any) -> int:
    """Image pixels per raw latent element along each side: 2 ** (levels - 1), 8 for every SD-family VAE."""
    return 2 ** (len(_config(vae_or_config).block_out_channels) - 1)


def latent_patch(vae_or_config: nn.Module | Any) -> tuple[int, int]:
    """(ph, pw) of the patches a diffusion model's latents are cut into: FLUX.2's ``patch_size`` (2, 2)
    (diffusers AutoencoderKLFlux2 config; its BatchNorm normalises the patchified latents), else (1, 1)."""
    c = _config(vae_or_config)
    patch = c.get("patch_size") if isinstance(c, dict) else getattr(c, "patch_size", None)
    return (int(patch[0]), int(patch[1])) if patch else (1, 1)


def size_multiple(vae_or_config: nn.Module | Any) -> int:
    """Image sides must be multiples of this: the downsample factor times the latent patch (8; 16 for FLUX.2)."""
    return downsample_factor(vae_or_config) * max(latent_patch(vae_or_config))


def normalized_channels(vae_or_config: nn.Module | Any) -> int:
    """Channels of normalised latents (what a diffusion model sees): latent_channels, times 4 for FLUX.2's 2x2 patches."""
    ph, pw = latent_patch(vae_or_config)
    return int(_config(vae_or_config).latent_channels) * ph * pw
