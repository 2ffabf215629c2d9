"""Fast CPU inference: Winograd for the 3x3 stride-1 convolutions that dominate the VAE.

Why: on a CPU, diffusers' eager ``AutoencoderKL`` already runs its convolutions near oneDNN's
direct-convolution peak and ``torch.compile`` gains nothing, so the only way to go faster is to do
less arithmetic. ~90% of encode/decode time is 3x3 stride-1 convolutions; Winograd's algorithm
computes them with 4-5x fewer multiplications (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016).

This module decides where each runs and patches the model: our F(6x6, 3x3) (``winograd.py``) for the
512-channel convs on small maps, NNPACK's Winograd (``torch._nnpack_spatial_convolution``) elsewhere
(measured per layer shape, docs/benchmarks.md), eager when neither is usable; diffusers'
``ResnetBlock2D`` runs with SiLU and the residual add in place. Data stays NCHW throughout.

Use::

    vae = fastconv.optimize(vae)                  # in place; returns vae; weights/state dict untouched
    with fastconv.disabled(): ...                 # eager convolutions inside the block
    fastconv.optimize(vae, enabled=False)         # undo
    KL_AUTOENCODER_FASTCONV=0                     # environment switch (settings.py, read at import):
                                                  # optimize() does nothing, patched convs run eager

A patched conv falls back to the eager ``nn.Conv2d.forward`` whenever the fast path does not apply:
autograd is recording (training), a non-CPU device (cuDNN already picks Winograd itself), a dtype
other than float32, or the switch is off. Max error against eager on images in [-1, 1]: see
docs/benchmarks.md (measured well under 1e-3).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import settings
from .winograd import CHANNEL_BLOCK, winograd_conv2d, winograd_library

MIN_CHANNELS = 16  # below this (conv_in 3->128, conv_out 128->3, 4->512) Winograd is not faster
WINOGRAD_MIN_CHANNELS_PRODUCT = 512 * 512  # use_winograd: our F(6,3) for C_in * C_out at least this ...
WINOGRAD_MAX_PIXELS = 128 * 128  # ... and H * W at most this; NNPACK elsewhere (measured, docs/benchmarks.md)


def nnpack_available() -> bool:
    """True when this PyTorch build has NNPACK and it initialised on this CPU."""
    try:
        return bool(torch.backends.nnpack.is_available()) and hasattr(torch, "_nnpack_spatial_convolution")
    except Exception:  # pragma: no cover - exotic builds
        return False


def active() -> bool:
    """Whether patched convolutions take the fast path right now (``settings.fastconv_enabled()``)."""
    return settings.fastconv_enabled()


def disabled() -> contextlib.AbstractContextManager[None]:
    """Run patched convolutions eagerly inside the block (this thread only): ``settings.use_fastconv(False)``."""
    return settings.use_fastconv(False)


# ----------------------------------------------------------------------------- patching


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


def use_winograd(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Our F(6,3) rather than NNPACK: measured per layer shape (docs/benchmarks.md), ours wins where the
    per-frequency products are big (512 -> 512 channels: 2.4-2.9x vs NNPACK's 1.8x over eager) and the
    image is small (<= 128x128: at 256x256 both give ~2.1x); at 128-256 channels NNPACK's fused
    transforms win (2.0x vs 1.1-1.5x). Without NNPACK, ours runs wherever the channels allow."""
    if conv.in_channels % CHANNEL_BLOCK or conv.out_channels % CHANNEL_BLOCK:
        return False
    if not nnpack_available():
        return True
    return conv.in_channels * conv.out_channels >= WINOGRAD_MIN_CHANNELS_PRODUCT and x.shape[-2] * x.shape[-1] <= WINOGRAD_MAX_PIXELS


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
        if use_winograd(self, x) and winograd_library() is not None:
            return winograd_conv2d(self, x)  # (B, O, H, W)
        if nnpack_available():
            # NNPACK reads NCHW-contiguous input; channels_last input would be copied anyway
            return torch._nnpack_spatial_convolution(x.contiguous(), w, self.bias, [1, 1], [1, 1])  # (B, O, H, W)
    return nn.Conv2d.forward(self, x)


def _fusable(block: nn.Module) -> bool:
    """A diffusers ResnetBlock2D as the VAE uses it: no time embedding, no resampling, SiLU, no active dropout."""
    return (
        type(block).__name__ == "ResnetBlock2D"
        and getattr(block, "upsample", 0) is None and getattr(block, "downsample", 0) is None
        and getattr(block, "time_emb_proj", 0) is None
        and isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
        and isinstance(getattr(block, "dropout", None), nn.Dropout)
    )


def _fast_resnet_forward(self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
    """diffusers ResnetBlock2D.forward with SiLU and the residual computed in place (no autograd only).

    Same operations in the same order, so bit-identical to the original for the same convs; it saves
    three full-size allocations and the division by ``output_scale_factor`` when that is 1.
    """
    if temb is not None or args or kwargs or torch.is_grad_enabled() or (self.training and self.dropout.p > 0) or not active():
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    h = F.silu(self.norm1(input_tensor), inplace=True)  # norm1 returns a new tensor
    h = F.silu(self.norm2(self.conv1(h)), inplace=True)
    h = self.conv2(h)
    x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    h = h.add_(x)  # == input + hidden (IEEE addition commutes)
    return h if self.output_scale_factor == 1 else h.div_(self.output_scale_factor)


def optimize(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Patch the eligible Conv2d modules of ``model`` in place to run Winograd on CPU; returns ``model``.

    Only each module's ``forward`` is replaced (an instance attribute): parameters, buffers and the
    state dict are unchanged, so saving, exporting and training behave as before. ``enabled=False``
    (or ``KL_AUTOENCODER_FASTCONV=0``, or neither the C kernels nor NNPACK usable) removes the patches.
    """
    on = enabled and settings.fastconv_enabled() and (winograd_library() is not None or nnpack_available())
    for m in model.modules():
        if _fusable(m):
            if on:
                m.forward = types.MethodType(_fast_resnet_forward, m)
            elif getattr(m.__dict__.get("forward"), "__func__", None) is _fast_resnet_forward:
                del m.forward
        if not isinstance(m, nn.Conv2d):
            continue
        if on and eligible(m):
            m.forward = types.MethodType(_fast_forward, m)
        elif "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) is _fast_forward:
            del m.forward
            m.__dict__.pop("_fastconv_cache", None)
    return model


def is_optimized(model: nn.Module) -> bool:
    """True if any Conv2d of ``model`` carries the fast forward."""
    return any(
        getattr(m.__dict__.get("forward"), "__func__", None) is _fast_forward for m in model.modules() if isinstance(m, nn.Conv2d)
    )
