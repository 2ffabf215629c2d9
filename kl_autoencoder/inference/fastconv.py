"""Fast CPU inference: patch a diffusers KL VAE's convolutions and blocks to run our kernels, fp32 or bf16.

Why: on a CPU, diffusers' eager ``AutoencoderKL`` runs its convolutions near oneDNN's direct-
convolution peak and ``torch.compile`` gains nothing, so the way to go faster is to do less
arithmetic and fewer passes over memory. ~90% of encode/decode arithmetic is 3x3 stride-1
convolutions; Winograd's algorithm computes them with 5x fewer multiplications (Lavin & Gray, 2016).

This module decides where each piece runs and patches the model (generic: ``nn.Conv2d``, diffusers'
``ResnetBlock2D`` and ``Upsample2D``, so any diffusers KL VAE):

- fp32: 3x3 convs by our fused Winograd F(6,3) (``winograd.py``); NNPACK's Winograd or eager where it
  does not apply. A ResnetBlock2D's GroupNorm + SiLU is applied while staging its conv's input
  (``groupnorm.py``: statistics in one pass, the normalised map never written; the statistics of conv1's
  and conv2's outputs come from the kernel that writes them), the residual added as conv2's output is
  written, a 1x1 ``conv_shortcut`` as one BLAS product accumulated into it; an Upsample2D as four 2x2
  sub-pixel convolutions on the low-resolution map by Winograd F(7,2); Downsample2D's pad as one copy.
- bf16 (model in bf16 on a CPU with avx512_bf16 or AMX, ``bf16.py``): on AMX, a ResnetBlock2D's two 3x3
  convs, Downsample2D's stride-2 conv and Upsample2D's sub-pixel convs run on our AMX kernel
  (``amx_conv.py``: GroupNorm + SiLU written into a zero-bordered map it reads, the residual added and the
  next GroupNorm's statistics summed as it writes); every other conv (and all of them without AMX) through
  oneDNN on channels_last with packed weights, GroupNorm + SiLU in one pass with fp32 statistics (norm2 in
  place; every other GroupNorm, e.g. the attention's, through the same kernels), the residual add fused into
  conv2, Upsample2D as sub-pixel convolutions whose copy also sums the next norm1's statistics, Downsample2D's
  pad as one strided copy. On a CPU without native bf16,
  ``optimize`` runs the model in fp32 instead (one warning line): emulated bf16 is slower than fp32.

Use::

    vae = fastconv.optimize(vae)                  # in place; returns vae; weights/state dict untouched
    with fastconv.disabled(): ...                 # eager inside the block
    fastconv.optimize(vae, enabled=False)         # undo
    KL_AUTOENCODER_FASTCONV=0                     # environment switch (settings.py, read at import):
                                                  # optimize() does nothing, patched modules run eager

A patched module falls back to its eager ``forward`` whenever the fast path does not apply:
autograd is recording (training), a non-CPU device (cuDNN already picks Winograd itself), a dtype
or layout the kernels do not handle, a norm whose forward was replaced (``tiling_approx``), or the
switch is off. fp32 outputs stay within 1e-4 of eager on images in [-1, 1] (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import types
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import settings
from . import amx_conv, bf16, groupnorm
from .cbuild import cpu_flags
from .winograd import CHANNEL_BLOCK, winograd_conv2d, winograd_library, winograd_upsample_conv2d

CL = torch.channels_last
MIN_CHANNELS = 16  # below this (conv_in 3->128, conv_out 128->3, 4->512) Winograd is not faster


def nnpack_available() -> bool:
    """True when this PyTorch build has NNPACK and it initialised on this CPU (the call initialises it)."""
    try:
        return bool(torch.backends.nnpack.is_available()) and hasattr(torch, "_nnpack_spatial_convolution")
    except Exception:  # pragma: no cover - exotic builds
        return False


def active() -> bool:
    """Whether patched modules take the fast path right now (``settings.fastconv_enabled()``)."""
    return settings.fastconv_enabled()


def disabled() -> contextlib.AbstractContextManager[None]:
    """Run patched modules eagerly inside the block (this thread only): ``settings.use_fastconv(False)``."""
    return settings.use_fastconv(False)


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


def use_winograd(conv: nn.Conv2d) -> bool:
    """Our F(6,3) for an eligible conv: its channels fit the 16-wide vectors and the kernels built. Without
    AVX-512 (the kernels' 16-float vectors split in two) NNPACK's AVX2 Winograd is preferred."""
    if conv.in_channels % CHANNEL_BLOCK or conv.out_channels % CHANNEL_BLOCK or winograd_library() is None:
        return False
    return "avx512f" in cpu_flags() or not nnpack_available()


def _fp32_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and x.dim() == 4
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def _bf16_ok(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return bf16.applies(conv, x) and bf16.supported()


def _fast_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if active():
        if eligible(self) and _fp32_ok(x, self.weight):
            if use_winograd(self):
                return winograd_conv2d(self, x)  # (B, O, H, W)
            if nnpack_available():
                # NNPACK reads NCHW-contiguous input; channels_last input would be copied anyway
                return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, [1, 1], [1, 1])
        elif _bf16_ok(self, x):
            y = bf16.conv2d(self, x)  # (B, O, H', W') channels_last
            return y if self.out_channels >= MIN_CHANNELS else y.contiguous()  # network outputs (image, moments) NCHW
    return nn.Conv2d.forward(self, x)


def _norm_silu_conv(norm: nn.Module, conv: nn.Conv2d, x: torch.Tensor, add_bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, stats: bool = False) -> torch.Tensor:
    """``conv(silu(norm(x)))`` (+ ``add_bias`` (C_out,) per channel) (+ ``residual``, a map of the output's
    shape): fp32 with GroupNorm + SiLU inside the Winograd input staging where it applies (``add_bias`` then
    joins the conv's bias, ``residual`` is added as the output is written, ``stats``: the output's channel
    statistics for the next GroupNorm come with it), else the two-pass GroupNorm + SiLU kernel, else eager
    norm and SiLU; the conv is patched."""
    if groupnorm.supported(norm, x):
        if x.dtype == torch.float32 and eligible(conv) and _fp32_ok(x, conv.weight) and use_winograd(conv):
            scale, shift = groupnorm.norm_scale_shift(norm, x)  # (B, C) each (x's own, if its writer attached them)
            return winograd_conv2d(conv, x, scale=scale, shift=shift, silu=True, add_bias=add_bias, residual=residual,
                                   stats=stats)
        y = conv(groupnorm.group_norm_silu(norm, x))
    else:
        y = conv(F.silu(norm(x), inplace=True))  # norm returns a new tensor
    y = y if add_bias is None else y.add_(add_bias.detach()[:, None, None])
    return y if residual is None else y.add_(residual)  # == input + hidden (IEEE addition commutes)


def _pointwise_shortcut(conv: nn.Module | None, x: torch.Tensor) -> bool:
    """A ResnetBlock2D's 1x1 ``conv_shortcut`` that runs as one matrix product per image on fp32 NCHW input."""
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
        and conv.dilation == (1, 1) and conv.groups == 1 and _fp32_ok(x, conv.weight)
    )


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
    """diffusers ResnetBlock2D.forward (temb None, eval) with our kernels; no autograd only.

    ``(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))) / output_scale_factor``; in fp32 the sum is
    computed in place into conv2's output, in bf16 inside conv2 (oneDNN's add post-op).
    """
    if temb is not None or args or kwargs or torch.is_grad_enabled() or (self.training and self.dropout.p > 0) or not active():
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    x = input_tensor
    if _amx_block(self, x):
        return _amx_resnet_forward(self, x)
    h = _norm_silu_conv(self.norm1, self.conv1, x, stats=True)  # fp32: norm2's statistics written with h
    if h.dtype == torch.bfloat16 and _bf16_ok(self.conv2, h) and groupnorm.supported(self.norm2, h):
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        # conv1's output is ours alone: normalised in place (no second map of that size written)
        h = bf16.conv2d(self.conv2, groupnorm.group_norm_silu(self.norm2, h, inplace=True), add=shortcut)  # (B, C, H, W)
        return h if self.output_scale_factor == 1 else h.div_(self.output_scale_factor)
    sc = self.conv_shortcut
    if _pointwise_shortcut(sc, x):
        # the 1x1 shortcut is a (C_out, C_in) @ (C_in, H*W) product on NCHW memory: accumulated by BLAS straight
        # into conv2's output (beta = 1), its bias joined to conv2's: no shortcut map, no separate add pass
        # NCHW as our kernel writes it (an eager conv2 on channels_last input is copied once)
        h = _norm_silu_conv(self.norm2, self.conv2, h, add_bias=sc.bias).contiguous()  # (B, C_out, H, W)
        x, w = x.contiguous(), sc.weight.detach().view(sc.out_channels, sc.in_channels)
        for k in range(x.shape[0]):
            h[k].view(sc.out_channels, -1).addmm_(w, x[k].view(sc.in_channels, -1))
        return h if self.output_scale_factor == 1 else h.div_(self.output_scale_factor)
    shortcut = sc(x) if sc is not None else x
    # the residual summed as conv2's output is written (fp32 Winograd), else added in place after it; the
    # output's statistics for the next block's norm1 come with it unless the division below changes it
    h = _norm_silu_conv(self.norm2, self.conv2, h, residual=shortcut, stats=self.output_scale_factor == 1)
    return h if self.output_scale_factor == 1 else h.div_(self.output_scale_factor)


def _amx_block(block: nn.Module, x: torch.Tensor) -> bool:
    """A bf16 ResnetBlock2D whose two 3x3 convs both run on ``amx_conv`` and whose norms our kernels handle."""
    return (
        x.dtype == torch.bfloat16 and amx_conv.applies(block.conv1, x) and amx_conv.applies(block.conv2, x)
        and groupnorm.supported(block.norm1, x) and groupnorm.supported(block.norm2, x)  # x: channels_last bf16
        and block.norm2.num_channels == block.conv1.out_channels and bf16.supported() and amx_conv.supported()
    )


def _amx_resnet_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block with both convs on AMX (``amx_conv``): norm1 + SiLU written into a zero-bordered map, conv1 into
    the interior of another (norm2's statistics from the same pass), norm2 + SiLU in place there, conv2 with the
    shortcut added (the next block's norm1 statistics from the same pass unless the output is rescaled)."""
    b, c, h, w = x.shape
    p1 = amx_conv.padded_empty(b, c, h, w)  # (B, C, H + 2, W + 2)
    groupnorm.apply_scale_shift_into(x, amx_conv.interior(p1), *groupnorm.norm_scale_shift(self.norm1, x), silu=True)
    p2 = amx_conv.padded_empty(b, self.conv1.out_channels, h, w)
    hid = amx_conv.conv3x3(self.conv1, p1, out=amx_conv.interior(p2), stats=True)  # (B, C_mid, H, W), a view into p2
    del p1
    groupnorm.apply_scale_shift_into(hid, hid, *groupnorm.norm_scale_shift(self.norm2, hid), silu=True)
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x  # (B, C_out, H, W)
    out = amx_conv.conv3x3(self.conv2, p2, residual=shortcut, stats=self.output_scale_factor == 1)
    return out if self.output_scale_factor == 1 else out.div_(self.output_scale_factor)


def _upsample_fusable(block: nn.Module) -> bool:
    """A diffusers Upsample2D that interpolates 2x (nearest) and then runs a 3x3 conv named ``conv``."""
    conv = getattr(block, "conv", None)
    return (
        type(block).__name__ == "Upsample2D"
        and getattr(block, "use_conv", False) and not getattr(block, "use_conv_transpose", True)
        and getattr(block, "interpolate", False) and getattr(block, "norm", 0) is None
        and getattr(block, "name", None) == "conv" and isinstance(conv, nn.Conv2d) and eligible(conv)
    )


def _fast_upsample_forward(self: nn.Module, hidden_states: torch.Tensor, output_size=None, *args, **kwargs):
    """diffusers Upsample2D.forward without materialising the 2x map: four 2x2 sub-pixel convolutions on the
    low-resolution map (``subpixel.py``), fp32 by Winograd F(7,2) (``winograd_upsample_conv2d``), bf16
    through oneDNN (``bf16.upsample_conv2d``)."""
    x = hidden_states
    if output_size is None and not args and not kwargs and active():
        if _fp32_ok(x, self.conv.weight) and use_winograd(self.conv):
            return winograd_upsample_conv2d(self.conv, x)  # (B, C, 2H, 2W)
        if _bf16_ok(self.conv, x):
            if amx_conv.applies(self.conv, x) and amx_conv.supported():
                return amx_conv.upsample_conv(self.conv, x)  # (B, C, 2H, 2W) channels_last, norm1's statistics
            return bf16.upsample_conv2d(self.conv, x)  # (B, C, 2H, 2W) channels_last
    return type(self).forward(self, hidden_states, output_size, *args, **kwargs)


def _downsample_fusable(block: nn.Module) -> bool:
    """A diffusers Downsample2D that pads (0, 1, 0, 1) and then runs a stride-2 conv named ``conv`` (SD's encoder)."""
    conv = getattr(block, "conv", None)
    return (
        type(block).__name__ == "Downsample2D"
        and getattr(block, "use_conv", False) and getattr(block, "padding", None) == 0
        and getattr(block, "norm", 0) is None and isinstance(conv, nn.Conv2d) and conv.padding == (0, 0)
    )


def pad_right_bottom(x: torch.Tensor) -> torch.Tensor:
    """``F.pad(x, (0, 1, 0, 1))`` (diffusers Downsample2D) as one strided copy and two zeroed edges, in ``x``'s
    layout (channels_last or NCHW): F.pad zero-fills the whole output first (SD encoder, fp32 128 x 512 x 512:
    20 vs 13-15 ms; bf16 ~2x)."""
    b, c, h, w = x.shape
    cl = x.is_contiguous(memory_format=CL) and not x.is_contiguous()
    y = torch.empty(b, c, h + 1, w + 1, dtype=x.dtype, memory_format=CL if cl else torch.contiguous_format)
    y[:, :, :h, :w] = x
    y[:, :, h, :] = 0
    y[:, :, :h, w] = 0
    return y  # (B, C, H + 1, W + 1)


def _fast_downsample_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """diffusers Downsample2D.forward with ``pad_right_bottom``; bf16: the conv through oneDNN (``bf16.conv2d``),
    fp32: eager (our Winograd is stride 1)."""
    x = hidden_states
    if not args and not kwargs and active():
        if _bf16_ok(self.conv, x):
            xp = pad_right_bottom(x)  # (B, C, H + 1, W + 1)
            if amx_conv.applies_strided(self.conv, xp) and amx_conv.supported():
                return amx_conv.conv3x3(self.conv, xp, stats=True)  # (B, C, H/2, W/2) channels_last, norm1's statistics
            return bf16.conv2d(self.conv, xp)  # (B, C, H/2, W/2) channels_last
        if _fp32_ok(x, self.conv.weight):
            return self.conv(pad_right_bottom(x))  # (B, C, H/2, W/2)
    return type(self).forward(self, hidden_states, *args, **kwargs)


_PATCHES = ((_fusable, _fast_resnet_forward), (_upsample_fusable, _fast_upsample_forward),
            (_downsample_fusable, _fast_downsample_forward),
            (lambda m: type(m) is nn.GroupNorm and groupnorm._own_forward(m), groupnorm.fast_forward),
            (lambda m: isinstance(m, nn.Conv2d), _fast_forward))


def _bf16_fallback(model: nn.Module) -> None:
    """A bf16 model on a CPU without native bf16: oneDNN would emulate it, slower than fp32, so run fp32."""
    p = next(model.parameters(), None)
    if p is not None and p.dtype == torch.bfloat16 and p.device.type == "cpu" and not bf16.supported():
        warnings.warn("this CPU has no avx512_bf16 or AMX: bf16 would be emulated (slower than fp32); "
                      "running the model in fp32", stacklevel=3)
        model.float()


def optimize(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Patch ``model``'s Conv2d, ResnetBlock2D and Upsample2D modules in place to run our CPU kernels; returns it.

    Only each module's ``forward`` is replaced (an instance attribute): parameters, buffers and the
    state dict are unchanged (except that a bf16 model on a CPU without native bf16 is cast to fp32),
    so saving, exporting and training behave as before. ``enabled=False`` (or ``KL_AUTOENCODER_FASTCONV=0``)
    removes the patches and the packed weights.
    """
    on = enabled and settings.fastconv_enabled()
    if on:
        _bf16_fallback(model)
    for m in model.modules():
        for applies, forward in _PATCHES:
            if applies(m):
                if on:
                    m.forward = types.MethodType(forward, m)
                elif getattr(m.__dict__.get("forward"), "__func__", None) is forward:
                    del m.forward
                    m.__dict__.pop("_fastconv_cache", None)
                    m.__dict__.pop("_bf16_cache", None)
                break
    return model


def is_optimized(model: nn.Module) -> bool:
    """True if any Conv2d of ``model`` carries the fast forward."""
    return any(
        getattr(m.__dict__.get("forward"), "__func__", None) is _fast_forward for m in model.modules() if isinstance(m, nn.Conv2d)
    )
