"""One training forward pass, and the posterior noise it uses."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..model import decode_raw, encoder_moments, posterior
from ..utils.devices import seeded_randn
from ..utils.seeding import derive_seed


class AutoencoderStep(nn.Module):
    """One forward pass for training: images -> (reconstruction, posterior mean, log-variance).

    Wrapping encoder and decoder in one module lets accelerate/DDP see a single forward.
    """

    def __init__(self, vae: nn.Module, decoder_only: bool = False):
        super().__init__()
        self.vae, self.decoder_only = vae, decoder_only

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad() if self.decoder_only else contextlib.nullcontext():
            moments = encoder_moments(self.vae, x)  # (B, 2C, H/8, W/8)
        mean, logvar = posterior.split_moments(moments)
        z = mean if noise is None else posterior.sample(mean, logvar, noise)
        return decode_raw(self.vae, z), mean, logvar  # (B, 3, H, W), (B, C, h, w) x2


def posterior_noise(shape: tuple[int, ...], seed: int, step: int, rank: int, micro: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Posterior noise (b, C, h, w) float32 on ``device``, keyed by each sample's place in the global batch:
    N processes with batch b draw exactly what one process with batch N*b draws. Drawn on the CPU and
    moved (``utils/devices.py``), so the same seed gives the same noise on any device."""
    b = shape[0]
    draws = [seeded_randn(tuple(shape[1:]), derive_seed("noise", seed, step, micro, rank * b + j), device) for j in range(b)]
    return torch.stack(draws)  # (b, C, h, w)
