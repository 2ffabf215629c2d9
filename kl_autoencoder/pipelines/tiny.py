"""Tiny diffusion pipelines assembled offline around a VAE: proof that a diffusion model runs in its latent space.

These carry random (untrained) denoisers: their images are noise-like, but every tensor passes through
the VAE's latent space at the right shape, which is what the demo and the tests show.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from ..errors import InputError
from ..model import downsample_factor, latent_normalization


def tiny_dit_pipeline(vae: AutoencoderKL, image_size: int = 64, *, seed: int = 0) -> DiTPipeline:
    """A DiTPipeline with a 2-layer random DiT transformer sized for ``vae``'s latents at ``image_size`` pixels.

    DiTPipeline decodes with ``latents / scaling_factor`` and ignores shift_factor, so a VAE with a
    shift factor is refused rather than decoded wrongly.
    """
    norm = latent_normalization(vae)
    if norm.kind != "scalar" or norm.shift_factor:
        raise InputError(f"DiTPipeline decodes latents / scaling_factor only; this VAE normalises {norm.describe()}: "
                         "use one without a shift (e.g. an f8c4 SD-style VAE)")
    f = downsample_factor(vae)
    if image_size % (2 * f):
        raise InputError(f"image_size {image_size} must be a multiple of {2 * f} (VAE factor {f} x DiT patch 2)")
    c = vae.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=c,
            out_channels=2 * c,  # learned sigma, as DiT-XL/2: the pipeline keeps the first C channels
            num_layers=2,
            sample_size=image_size // f,
            patch_size=2,
            num_embeds_ada_norm=10,  # 10 classes
        )
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    return DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler)
