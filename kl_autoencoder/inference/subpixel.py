"""Nearest 2x upsampling followed by a 3x3 conv (diffusers ``Upsample2D``) as four 2x2 sub-pixel convolutions.

Each output pixel of the 2x map reads a 3x3 window of the upsampled map, which covers only 2x2 pixels of the
low-resolution map; which taps land on which pixel depends on the pixel's phase (row and column parity). So
the upsample + conv equals one 2x2 conv per phase on the low-resolution map, 4 instead of 9 products per
output (2.25x fewer) and no upsampled map. Used by both CPU paths: bf16 through oneDNN (``bf16.py``) and fp32
by Winograd F(7,2) (``winograd.py``).
"""

from __future__ import annotations

import torch


def subpixel_weights(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """3x3 kernel on the 2x nearest-upsampled map -> 2x2 kernels on the low-resolution map, one per phase.

    Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. low-resolution rows i - 1, i
    (a = 0: taps 0 | 1 + 2) or i, i + 1 (a = 1: taps 0 + 1 | 2); columns likewise. Returned as
    (4 * C_out, C_in, 2, 2), phase 2a + b in block a * 2 + b, summed in ``dtype``.
    """
    w = weight.detach().to(dtype)  # (C_out, C_in, 3, 3)
    rows = [torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2), torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)]
    phases = []
    for a in range(2):
        r = rows[a]  # (C_out, C_in, 2, 3)
        cols = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], 3), torch.stack([r[..., 0] + r[..., 1], r[..., 2]], 3)]
        phases += cols  # b = 0, 1
    return torch.cat(phases, 0)  # (4 * C_out, C_in, 2, 2)
