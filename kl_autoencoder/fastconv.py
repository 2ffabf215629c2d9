"""Fast CPU inference: Winograd (NNPACK) for the 3x3 stride-1 convolutions that dominate the VAE.

Why: on a CPU, diffusers' eager ``AutoencoderKL`` already runs its convolutions near oneDNN's
direct-convolution peak and ``torch.compile`` gains nothing, so the only way to go faster is to do
less arithmetic. ~90% of encode/decode time is 3x3 stride-1 convolutions (the ResNet convs and the
convs after each nearest-neighbour upsample); Winograd's algorithm computes those with 4-5x fewer
multiplications (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
PyTorch ships NNPACK, whose ``auto`` algorithm picks Winograd F(6x6, 3x3) for 3x3 kernels; it is
reachable as ``torch._nnpack_spatial_convolution`` (inference only: it has no backward for weights).

Use::

    vae = fastconv.optimize(vae)                  # in place; returns vae; weights/state dict untouched
    with fastconv.disabled(): ...                 # eager convolutions inside the block
    fastconv.optimize(vae, enabled=False)         # undo
    KL_AUTOENCODER_FASTCONV=0                     # environment switch: optimize() does nothing and
                                                  # already-patched convs run eager

A patched conv falls back to the eager ``nn.Conv2d.forward`` whenever the fast path does not apply:
autograd is recording (training), a non-CPU device (cuDNN already picks Winograd itself), a dtype
other than float32, or the switch is off. Max error against eager on images in [-1, 1]: see
docs/benchmarks.md (measured well under 1e-3).
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
from typing import Iterator

import torch
import torch.nn as nn

ENV_VAR = "KL_AUTOENCODER_FASTCONV"
MIN_CHANNELS = 16  # below this (conv_in 3->128, conv_out 128->3, 4->512) NNPACK is not faster

_state = threading.local()


def env_enabled() -> bool:
    """False when ``KL_AUTOENCODER_FASTCONV`` is 0/false/off/no."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def nnpack_available() -> bool:
    """True when this PyTorch build has NNPACK and it initialised on this CPU."""
    try:
        return bool(torch.backends.nnpack.is_available()) and hasattr(torch, "_nnpack_spatial_convolution")
    except Exception:  # pragma: no cover - exotic builds
        return False


def active() -> bool:
    """Whether patched convolutions take the fast path right now (env switch, ``disabled()`` block)."""
    return env_enabled() and not getattr(_state, "disabled", False)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run patched convolutions eagerly inside the block (this thread only)."""
    old = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = old


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride 1, padding 1, zero-padded, ungrouped Conv2d with at least MIN_CHANNELS in and out."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels >= MIN_CHANNELS
        and conv.out_channels >= MIN_CHANNELS
    )


def _fast_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.dim() == 4
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and active()
    ):
        # NNPACK reads NCHW-contiguous input; channels_last input would be copied anyway
        return torch._nnpack_spatial_convolution(x.contiguous(), w, self.bias, [1, 1], [1, 1])  # (B, O, H, W)
    return nn.Conv2d.forward(self, x)


def optimize(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Patch the eligible Conv2d modules of ``model`` in place to run Winograd on CPU; returns ``model``.

    Only each module's ``forward`` is replaced (an instance attribute): parameters, buffers and the
    state dict are unchanged, so saving, exporting and training behave as before. ``enabled=False``
    (or ``KL_AUTOENCODER_FASTCONV=0``, or no NNPACK in this build) removes the patches instead.
    """
    on = enabled and env_enabled() and nnpack_available()
    for m in model.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if on and eligible(m):
            m.forward = types.MethodType(_fast_forward, m)
        elif "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) is _fast_forward:
            del m.forward
    return model


def is_optimized(model: nn.Module) -> bool:
    """True if any Conv2d of ``model`` carries the fast forward."""
    return any(
        getattr(m.__dict__.get("forward"), "__func__", None) is _fast_forward for m in model.modules() if isinstance(m, nn.Conv2d)
    )
