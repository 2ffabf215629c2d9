"""The encoder's diagonal Gaussian posterior: moments, samples and the KL term, in one place.

diffusers' ``DiagonalGaussianDistribution`` (models/autoencoders/vae.py) splits the encoder output into
mean and log-variance and clamps the log-variance to [-30, 20]; every path here does the same.
"""

from __future__ import annotations

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers DiagonalGaussianDistribution


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output (B, 2C, h, w) -> (mean, logvar), each (B, C, h, w), logvar clamped as diffusers does."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A posterior sample ``mean + exp(logvar / 2) * noise``; ``noise`` is standard normal, shaped like ``mean``."""
    return mean + torch.exp(0.5 * logvar) * noise.to(device=mean.device, dtype=mean.dtype)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats, summed per sample: (B, C, h, w) -> (B,).

    Closed form 0.5 * sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, appendix B), in the
    inputs' dtype (pass float64 for exact sums).
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
