"""Diffusion pipelines around a VAE: swapping a pipeline's VAE after a latent check, tiny offline pipelines."""

from .swap import IncompatibleVAEError, SwapReport, compare_vaes, swap_vae
from .tiny import tiny_dit_pipeline

__all__ = ["IncompatibleVAEError", "SwapReport", "compare_vaes", "swap_vae", "tiny_dit_pipeline"]
