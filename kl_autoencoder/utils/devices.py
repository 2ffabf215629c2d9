"""Tensors made where they are used: reproducible noise on any device, host-to-device copies, data checks.

The rule for random draws (posterior noise, sampled latents): the numbers come from a CPU
``torch.Generator`` seeded by the caller and are then copied to the device that uses them. So the
same seed gives the same noise on a CPU, on any GPU, and with any number of processes (each draw is
keyed by the sample's place, see ``utils/seeding.py``), at the cost of one host-to-device copy of a
latent-sized tensor (1/48 of the image's values for an f8c4 VAE). A ``torch.Generator`` the caller
made on a device is used there instead (diffusers' ``randn_tensor`` convention).
"""

from __future__ import annotations

from typing import Any

import torch


def has_data(t: torch.Tensor) -> bool:
    """False for tensors that carry shapes only (meta, fake tensors of a shape audit): value checks skip them."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str, dtype: torch.dtype = torch.float32
          ) -> torch.Tensor:
    """Standard normal noise of ``shape`` from ``generator``, on ``device`` (drawn on the generator's device, then moved)."""
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype, non_blocking=True)


def seeded_randn(shape: tuple[int, ...], seed: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``randn`` from a CPU generator seeded with ``seed``: the same numbers on every device."""
    return randn(shape, torch.Generator(device="cpu").manual_seed(seed), device, dtype)


def to_device(x: Any, device: torch.device | str) -> Any:
    """``x`` (a tensor, or a dict/list/tuple of them) on ``device``; CPU tensors bound for CUDA are pinned
    first so the copy runs asynchronously (``non_blocking``), as a DataLoader with ``pin_memory=True`` does."""
    device = torch.device(device)
    if isinstance(x, torch.Tensor):
        if x.device == device:
            return x
        if device.type == "cuda" and x.device.type == "cpu" and torch.cuda.is_available() and not x.is_pinned():
            x = x.pin_memory()  # page-locked: the copy below runs asynchronously
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
