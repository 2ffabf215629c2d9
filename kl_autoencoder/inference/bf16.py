"""bf16 CPU inference through oneDNN: channels_last activations, weights packed once, AMX / avx512_bf16.

Why: a CPU with ``avx512_bf16`` runs bf16 dot products at twice the fp32 rate, one with AMX
(``amx_bf16``, Intel Xeon since Sapphire Rapids) at many times it, and diffusers users already run
their VAE in bf16 on GPUs. PyTorch's eager bf16 convolutions take oneDNN's fastest kernels only on
channels_last input and reorder the weights at every call; here every conv runs on channels_last
bf16 with its weights packed once per layer and input size (``torch.ops.mkldnn._reorder_convolution_
weight`` / ``_convolution_pointwise``: products in bf16, sums in fp32, one rounding per output).

- ``conv2d``: any ``nn.Conv2d`` (zero padding), optionally adding a residual in the same kernel
  (oneDNN's binary post-op), so the ResnetBlock2D sum is not a separate pass.
- ``upsample_conv2d``: nearest 2x upsampling then a 3x3 conv (diffusers ``Upsample2D``) as two 2x2
  convs with 2 x C_out outputs each on the low-resolution input, one output per sub-pixel phase
  (``subpixel.py``): 4 instead of 9 products per output (2.25x fewer) and no upsampled map. Exact in
  real arithmetic: each phase's 2x2 kernel sums the 3x3 taps that read the same low-resolution pixel
  (rounded once to bf16).

On a CPU with AMX the ResnetBlock2D, Downsample2D and Upsample2D convs run on our own AMX kernel instead
(``amx_conv.py``, faster than oneDNN's there); these oneDNN paths serve the other convs and CPUs.

GroupNorm statistics are float32 (``groupnorm.py``). Where the CPU has neither ``avx512_bf16`` nor
AMX, oneDNN would emulate bf16 (slower than fp32): ``fastconv.optimize`` runs such a model in fp32.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn as nn

from . import groupnorm
from .cbuild import PRELUDE, build, cpu_flags
from .packed_cache import PackedCache, weight_key
from .subpixel import subpixel_weights

CL = torch.channels_last
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# The four sub-pixel phases of the two 2x2 convs' outputs o0, o1 ((h+1, w+1, 2 x C_out) each: phases (a, 0),
# (a, 1) of output-row parity a) interleaved into (2h, 2w, C_out),
# channels_last bf16, one row of C_out channels at a time (torch's strided copy_ of the same took 5-10x longer).
_SOURCE = PRELUDE + r"""
/* The same, also summing each channel's values (shifted by K[c], float per 64 pixels, double beyond): the
   GroupNorm statistics of the next ResnetBlock2D's norm1 (groupnorm.py), so that its own statistics pass over the
   whole 2x map is saved. sums: (2, co) doubles, zeroed by the caller. co: a multiple of 16. */
typedef uint16_t u16v __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32v __attribute__((vector_size(64), aligned(64)));
void subpixel_interleave_sums(const uint16_t* o0, const uint16_t* o1, uint16_t* y, long h, long w, long co, int nt, const float* K,
                              double* sums) {
  #pragma omp parallel num_threads(nt)
  {
    double* acc = (double*)calloc(2 * co, sizeof(double));
    float* f = (float*)aligned_alloc(64, 2 * co * sizeof(float));
    #pragma omp for schedule(static)
    for (long i = 0; i < h; i++)
      for (int a = 0; a < 2; a++) {
        uint16_t* yr = y + (2 * i + a) * 2 * w * co;
        for (long j0 = 0; j0 < w; j0 += 32) {  /* 64 output pixels per float partial sum */
          long j1 = j0 + 32 < w ? j0 + 32 : w;
          for (long c0 = 0; c0 < co; c0 += 16) {  /* one vector of channels, its sums in registers */
            v16 k = vload(K + c0), s1 = vset1(0.f), s2 = vset1(0.f);
            for (long j = j0; j < j1; j++)
              for (int b = 0; b < 2; b++) {
                u16v raw = *(const u16v*)((a ? o1 : o0) + (((i + a) * (w + 1) + j + b) * 2 + b) * co + c0);
                *(u16v*)(yr + (2 * j + b) * co + c0) = raw;
                v16 d = (v16)(__builtin_convertvector(raw, u32v) << 16) - k;
                s1 += d; s2 += d * d;
              }
            vstore(f + c0, s1); vstore(f + co + c0, s2);
          }
          for (long c = 0; c < 2 * co; c++) acc[c] += f[c];
        }
      }
    #pragma omp critical
    for (long c = 0; c < 2 * co; c++) sums[c] += acc[c];
    free(acc); free(f);
  }
}
void subpixel_interleave(const uint16_t* o0, const uint16_t* o1, uint16_t* y, long h, long w, long co, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (long i = 0; i < h; i++)
    for (int a = 0; a < 2; a++) {
      uint16_t* yr = y + (2 * i + a) * 2 * w * co;
      for (long j = 0; j < w; j++)
        for (int b = 0; b < 2; b++)
          memcpy(yr + (2 * j + b) * co, (a ? o1 : o0) + (((i + a) * (w + 1) + j + b) * 2 + b) * co, co * 2);
    }
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    i64, ptr = ctypes.c_long, ctypes.c_void_p
    return build("bf16", _SOURCE, {"subpixel_interleave": (None, [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]),
                                   "subpixel_interleave_sums": (None, [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr])})


@functools.cache  # asked per conv; the CPU and the torch build do not change
def supported() -> bool:
    """True when this CPU computes bf16 natively (``avx512_bf16`` or AMX) and PyTorch's oneDNN has bf16."""
    try:
        mkldnn_ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False
    return mkldnn_ok and hasattr(torch.ops.mkldnn, "_convolution_pointwise") and any(f in cpu_flags() for f in BF16_FLAGS)


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` may run here: CPU, bf16 input and weights, zero padding, no autograd recording."""
    w = conv.weight
    return (
        x.device.type == "cpu" and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.dim() == 4
        and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


# Input sizes kept packed per conv and kind: exact tiling alternates interior, edge and corner tile sizes, and
# oneDNN packs a weight for one input size; with one entry each change of size repacked every conv.
PACKED_SIZES = 4


def _packed(conv: nn.Conv2d, kind: str, make, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(packed weight, bias) cached on the module per ``kind`` and input size, up to ``PACKED_SIZES`` sizes
    (weight data pointer and version in the key, so a replaced or modified weight is repacked); not a buffer,
    the state dict is unchanged."""
    w = conv.weight
    version, size = weight_key(w), tuple(x.shape[1:])
    cache = conv.__dict__.setdefault("_bf16_cache", PackedCache())
    entries = cache.get(kind)
    if entries is None or entries[0] != version:
        entries = cache[kind] = (version, {})  # a new or changed weight: every size packed afresh
    table = entries[1]
    entry = table.get(size)
    if entry is None:
        weight, bias, padding = make()
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, padding, list(conv.stride), list(conv.dilation), conv.groups, list(x.shape)
        )
        while len(table) >= PACKED_SIZES:
            table.pop(next(iter(table), None), None)  # the oldest size
        entry = table[size] = (packed, bias)
    return entry  # this call's entry, whatever another thread stored meanwhile


def conv2d(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x) (+ add)`` in bf16, (B, C_out, H', W') channels_last; ``applies(conv, x)`` must hold."""
    x = x.contiguous(memory_format=CL)

    def make():
        b = conv.bias.detach() if conv.bias is not None else None
        return conv.weight.detach(), b, list(conv.padding)

    w, b = _packed(conv, "conv", make, x)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if add is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, "none", [], "")
    add = add.contiguous(memory_format=CL)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, add, w, b, *args, "add", None, None, [], None)


def upsample_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1 conv, bf16,
    (B, C_out, 2h, 2w) channels_last, by four 2x2 sub-pixel convolutions run as two."""
    b, _, h, w = x.shape
    co = conv.out_channels
    x = x.contiguous(memory_format=CL)

    def make(a: int):  # the two phases (a, 0), (a, 1) of output row parity a
        bias = conv.bias.detach().repeat(2) if conv.bias is not None else None  # (2 * C_out,)
        return subpixel_weights(conv.weight)[2 * a * co : (2 * a + 2) * co].to(torch.bfloat16), bias, [1, 1]

    # padding 1 and a 2x2 kernel: output (r, s) reads low-res rows r - 1, r and columns s - 1, s. One conv per
    # row parity (2 C_out outputs each): oneDNN ran the two in 70 ms against 77 for one with 4 C_out (256
    # channels at 256 px; 512 at 128: 51 vs 54)
    outs = []
    for a in range(2):
        wt, bias = _packed(conv, f"subpixel{a}", lambda a=a: make(a), x)
        o = torch.ops.mkldnn._convolution_pointwise(x, wt, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        outs.append(o.contiguous(memory_format=CL))  # (B, 2 C_out, h + 1, w + 1): phases (a, 0), (a, 1)
    o0, o1 = outs
    y = torch.empty(b, co, 2 * h, 2 * w, dtype=x.dtype, memory_format=CL)  # (B, C_out, 2h, 2w)
    lib = library()
    if lib is not None and co % 16 == 0:
        # the copy also sums each channel, shifted by its first value (phase 0 at (0, 0)): norm1's statistics
        shifts = o0[:, :co, 0, 0].float().contiguous()  # (B, C_out)
        sums = torch.zeros(b, 2, co, dtype=torch.float64)  # (B, [sum(y - K), sum((y - K)^2)], C_out)
        for k in range(b):
            lib.subpixel_interleave_sums(o0[k].data_ptr(), o1[k].data_ptr(), y[k].data_ptr(), h, w, co, torch.get_num_threads(),
                                         shifts[k].data_ptr(), sums[k].data_ptr())
        groupnorm.attach_channel_sums(y, sums, shifts)
        return y
    if lib is not None:
        for k in range(b):
            lib.subpixel_interleave(o0[k].data_ptr(), o1[k].data_ptr(), y[k].data_ptr(), h, w, co, torch.get_num_threads())
        return y
    y6 = y.permute(0, 2, 3, 1).view(b, h, 2, w, 2, co)  # (B, h, a, w, b, C_out)
    for a in range(2):
        o = outs[a].permute(0, 2, 3, 1)  # (B, h+1, w+1, 2 * C_out), a view of the channels_last memory
        for c in range(2):
            y6[:, :, a, :, c, :] = o[:, a : a + h, c : c + w, c * co : (c + 1) * co]
    return y
