"""Putting a loaded VAE where and how it runs: device, dtype, and the optional speed-ups of each device.

| device | default | optional (off by default) |
|---|---|---|
| CUDA (``cuda`` when available) | eager in the chosen dtype; cuDNN picks its own algorithms | ``channels_last`` and ``torch.compile`` of encoder and decoder, as diffusers' docs recommend for a VAE |
| CPU | the fast CPU convolutions of ``fastconv.py`` (fp32) | ``torch.compile`` instead of them (measured slower here: docs/benchmarks.md) |

fp16 on a CPU is refused with one line and runs in fp32: PyTorch's CPU fp16 convolution is hundreds of times
slower than fp32 (``evaluation/precision.py``); bf16 runs where asked.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..model import resolve_dtype
from .fastconv import optimize

log = logging.getLogger("kl_autoencoder")


def default_device() -> torch.device:
    """``cuda`` when a GPU is there, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(vae: nn.Module, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            compile: bool = False, channels_last: bool = False) -> nn.Module:
    """``vae`` moved to ``device`` (default: ``default_device()``) in ``dtype`` (default: as it is), with the
    device's speed-ups; in place, returned. Weights and the state dict are unchanged (beyond the cast)."""
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if torch_dtype == torch.float16 and device.type == "cpu":
        log.warning("fp16 on a CPU runs hundreds of times slower than fp32: running in fp32 (use bf16 or a GPU)")
        torch_dtype = torch.float32
    vae.to(device)
    if torch_dtype is not None and next(vae.parameters()).dtype != torch_dtype:
        vae.to(torch_dtype)
    if channels_last:
        vae.to(memory_format=torch.channels_last)  # diffusers docs: "Memory-efficient ... channels_last"
    if compile:
        vae.encoder.compile()  # nn.Module.compile: in place, the state dict keeps its keys
        vae.decoder.compile()
    elif device.type == "cpu":
        optimize(vae)
    return vae.eval()
