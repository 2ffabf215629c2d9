"""GroupNorm (+ SiLU) for CPU inference in two passes over the map: statistics, then one fused apply.

Why: eager ``F.silu(GroupNorm(x))`` reads the map three times and writes it twice (statistics,
normalise, activation), and SiLU's exp runs on its own pass; these pointwise passes were ~23% of our
fp32 decode (docs/benchmarks.md). Here ``norm_scale_shift`` folds each image's group statistics and
the affine weights into a per-channel ``x * scale + shift`` (one read), which ``winograd.py`` applies
while staging the next conv's input (the normalised map is never written), or ``group_norm_silu``
applies in one read + write where no Winograd conv follows (bf16, attention, narrow layers).

Statistics are accumulated in float32 vectors per chunk of at most 4096 values and summed in float64,
shifted by one value of the group (so E[x^2] - E[x]^2 does not cancel), as GroupNorm's own CPU
kernel keeps float32 statistics for bf16 input. Layouts: NCHW float32, and channels_last bfloat16 (the
bf16 path, ``bf16.py``), whose input is widened to float32 and whose output is rounded once to bf16
(round to nearest even); its SiLU is a cheaper approximation accurate far below bf16's rounding step.
A map whose writer already summed its channels (the bf16 upsampler) carries those sums and skips the
statistics pass. ``fast_forward`` is ``GroupNorm.forward`` through these kernels (``fastconv`` patches it in).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn as nn

from .. import settings
from .cbuild import PRELUDE, build

_SOURCE = PRELUDE + r"""
typedef uint16_t u16v __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32v __attribute__((vector_size(64), aligned(64)));
static inline v16 bf16_load(const uint16_t* p) {
  return (v16)(__builtin_convertvector(*(const u16v*)p, u32v) << 16);
}
#ifdef __AVX512F__
#include <immintrin.h>
#endif
static inline void bf16_store(uint16_t* p, v16 v) {   /* round to nearest even, as torch's .to(bfloat16) */
#ifdef __AVX512BF16__
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh((__m512)v));  /* the CPU's own rounding, one instruction */
#else
  u32v b = (u32v)v;
  b = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  *(u16v*)p = __builtin_convertvector(b, u16v);
#endif
}
/* SiLU for an output rounded to bf16 (8 significant bits): exp(-x) = 2^n 2^f with |f| <= 1/2, 2^f by a degree-5
   Taylor polynomial in f ln 2 (relative error < 3e-6), 2^n by vscalefps (overflow to inf, underflow to 0: no
   clamping), 1 / (1 + e) by vrcp14ps (relative error < 2^-14). Both errors are far below bf16's rounding step
   (2^-9), so few outputs change against the exact SiLU and those by one bf16 step; it costs ~4x less than vsilu's
   division and degree-6 exp. */
static inline v16 vsilu_bf16(v16 v) {
#ifdef __AVX512F__
  __m512 x = (__m512)v;
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f));  /* -x log2 e */
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558146e-3f);                           /* ln2^5 / 5! ... */
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));                        /* 2^f */
  __m512 e = _mm512_scalef_ps(p, n);                                      /* exp(-x) */
  return (v16)_mm512_mul_ps(x, _mm512_rcp14_ps(_mm512_add_ps(e, _mm512_set1_ps(1.0f))));
#else
  return vsilu(v);
#endif
}
/* per-channel x * scale + shift from per-group shifted sums s1 = sum(x - K), s2 = sum((x - K)^2) over n values */
static void fold(const double* s1, const double* s2, const float* K, long n, long C, long G, const float* gamma,
                 const float* beta, float eps, float* scale, float* shift) {
  long cg = C / G;
  for (long g = 0; g < G; g++) {
    double d = s1[g] / n, mean = K[g] + d, var = s2[g] / n - d * d;
    double rstd = 1.0 / __builtin_sqrt((var > 0 ? var : 0) + eps);
    for (long c = g * cg; c < (g + 1) * cg; c++) {
      double a = (gamma ? gamma[c] : 1.0) * rstd;
      scale[c] = (float)a;
      shift[c] = (float)((beta ? beta[c] : 0.0) - mean * a);
    }
  }
}
/* NCHW float32, one image: group g is channels [g C/G, (g+1) C/G) x HW, contiguous */
void gn_affine_nchw(const float* x, long C, long HW, long G, const float* gamma, const float* beta, float eps,
                    float* scale, float* shift, int nt) {
  long n = C / G * HW;
  double* s1 = (double*)calloc(2 * G, sizeof(double)); double* s2 = s1 + G;
  float* K = (float*)malloc(G * sizeof(float));
  #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (long g = 0; g < G; g++) {
    const float* p = x + g * n;
    float k = p[0]; K[g] = k;
    double a1 = 0, a2 = 0;
    for (long c0 = 0; c0 < n; c0 += 4096) {
      long c1 = c0 + 4096 < n ? c0 + 4096 : n, i = c0;
      v16 v1 = vset1(0.f), v2 = vset1(0.f);
      for (; i + 16 <= c1; i += 16) { v16 d = vload(p + i) - k; v1 += d; v2 += d * d; }
      float r1 = 0, r2 = 0;
      for (; i < c1; i++) { float d = p[i] - k; r1 += d; r2 += d * d; }
      for (int l = 0; l < 16; l++) { r1 += v1[l]; r2 += v2[l]; }
      a1 += r1; a2 += r2;
    }
    s1[g] = a1; s2[g] = a2;
  }
  fold(s1, s2, K, n, C, G, gamma, beta, eps, scale, shift);
  free(s1); free(K);
}
void affine_nchw(const float* x, float* y, const float* scale, const float* shift, long C, long HW, int silu, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (long c = 0; c < C; c++) {
    const float* p = x + c * HW; float* q = y + c * HW;
    float a = scale[c], b = shift[c];
    long i = 0;
    for (; i + 16 <= HW; i += 16) { v16 v = vload(p + i) * a + b; vstore(q + i, silu ? vsilu(v) : v); }
    for (; i < HW; i++) { v16 v = vset1(p[i] * a + b); q[i] = (silu ? vsilu(v) : v)[0]; }
  }
}
/* channels_last bfloat16, one image: x (HW, C), C a multiple of 16 */
void gn_affine_nhwc_bf16(const uint16_t* x, long HW, long C, long G, const float* gamma, const float* beta, float eps,
                         float* scale, float* shift, int nt) {
  long cg = C / G, nv = C / 16;
  double* s = (double*)calloc(2 * C, sizeof(double));
  float* Kc = (float*)malloc(C * sizeof(float));
  float* K = (float*)malloc(G * sizeof(float));
  for (long g = 0; g < G; g++) {  /* shift: the group's first value */
    uint32_t b = (uint32_t)x[g * cg] << 16; memcpy(&K[g], &b, 4);
    for (long c = g * cg; c < (g + 1) * cg; c++) Kc[c] = K[g];
  }
  #pragma omp parallel num_threads(nt)
  {
    double* a = (double*)calloc(2 * C, sizeof(double));
    #pragma omp for schedule(static)
    for (long p0 = 0; p0 < HW; p0 += 64) {  /* 64 pixels (<= 64 KiB) per chunk */
      long p1 = p0 + 64 < HW ? p0 + 64 : HW;
      long j = 0;
      for (; j + 4 <= nv; j += 4) {  /* 64 channels at a time: each pixel's 128 contiguous bytes, 8 accumulators */
        v16 k0 = vload(Kc + 16 * j), k1 = vload(Kc + 16 * j + 16), k2 = vload(Kc + 16 * j + 32), k3 = vload(Kc + 16 * j + 48);
        v16 a0 = vset1(0.f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (long p = p0; p < p1; p++) {
          const uint16_t* q = x + p * C + 16 * j;
          v16 d0 = bf16_load(q) - k0, d1 = bf16_load(q + 16) - k1, d2 = bf16_load(q + 32) - k2, d3 = bf16_load(q + 48) - k3;
          a0 += d0; a1 += d1; a2 += d2; a3 += d3; b0 += d0 * d0; b1 += d1 * d1; b2 += d2 * d2; b3 += d3 * d3;
        }
        for (int l = 0; l < 16; l++) {
          a[16 * j + l] += a0[l]; a[16 * j + 16 + l] += a1[l]; a[16 * j + 32 + l] += a2[l]; a[16 * j + 48 + l] += a3[l];
          a[C + 16 * j + l] += b0[l]; a[C + 16 * j + 16 + l] += b1[l]; a[C + 16 * j + 32 + l] += b2[l]; a[C + 16 * j + 48 + l] += b3[l];
        }
      }
      for (; j < nv; j++) {  /* the rest, one vector of channels at a time */
        v16 k = vload(Kc + 16 * j), v1 = vset1(0.f), v2 = vset1(0.f);
        for (long p = p0; p < p1; p++) { v16 d = bf16_load(x + p * C + 16 * j) - k; v1 += d; v2 += d * d; }
        for (int l = 0; l < 16; l++) { a[16 * j + l] += v1[l]; a[C + 16 * j + l] += v2[l]; }
      }
    }
    #pragma omp critical
    for (long c = 0; c < 2 * C; c++) s[c] += a[c];
    free(a);
  }
  double* s1 = (double*)calloc(2 * G, sizeof(double)); double* s2 = s1 + G;
  for (long c = 0; c < C; c++) { s1[c / cg] += s[c]; s2[c / cg] += s[C + c]; }
  fold(s1, s2, K, HW * cg, C, G, gamma, beta, eps, scale, shift);
  free(s); free(s1); free(Kc); free(K);
}
/* rows of W pixels, xrs / yrs elements apart (a padded map's interior: amx_conv.py) */
void affine_nhwc_bf16(const uint16_t* x, long xrs, uint16_t* y, long yrs, const float* scale, const float* shift, long H, long W,
                      long C, int silu, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
  for (long r = 0; r < H; r++)
    for (long p = 0; p < W; p++) {
      const uint16_t* xp = x + r * xrs + p * C;
      uint16_t* yp = y + r * yrs + p * C;
      if (silu)
        for (long c = 0; c < C; c += 16) bf16_store(yp + c, vsilu_bf16(bf16_load(xp + c) * vload(scale + c) + vload(shift + c)));
      else
        for (long c = 0; c < C; c += 16) bf16_store(yp + c, bf16_load(xp + c) * vload(scale + c) + vload(shift + c));
    }
}
"""


@functools.cache  # called per norm: hashing the source each time cost ~12 us
def library() -> ctypes.CDLL | None:
    i64, ptr, f32, i32 = ctypes.c_long, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    stats = (None, [ptr, i64, i64, i64, ptr, ptr, f32, ptr, ptr, i32])
    apply = (None, [ptr, ptr, ptr, ptr, i64, i64, i32, i32])
    apply_rows = (None, [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i32, i32])
    return build("groupnorm", _SOURCE, {"gn_affine_nchw": stats, "gn_affine_nhwc_bf16": stats,
                                         "affine_nchw": apply, "affine_nhwc_bf16": apply_rows})


def _layout(x: torch.Tensor) -> str | None:
    """"nchw" (float32, contiguous), "nhwc_bf16" (bfloat16, channels_last, C % 16 == 0) or None (not handled)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return None
    if x.dtype == torch.float32 and x.is_contiguous():
        return "nchw"
    if x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] % 16 == 0:
        return "nhwc_bf16"
    return None


def _own_forward(norm: nn.Module) -> bool:
    """The norm runs GroupNorm.forward or our ``fast_forward`` (not, e.g., ``tiling_approx``'s fixed statistics)."""
    f = norm.__dict__.get("forward")
    return f is None or getattr(f, "__func__", None) is fast_forward


def supported(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether these kernels handle ``norm(x)``: an ``nn.GroupNorm`` whose forward is not overridden
    (``tiling_approx`` patches norms with fixed statistics), on a layout of ``_layout``, without autograd
    recording (neither ``x`` nor the norm's weights asking for gradients: the kernels have no backward)."""
    return (
        type(norm) is nn.GroupNorm
        and _own_forward(norm)
        and _layout(x) is not None
        and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters())))
        and library() is not None
    )


# Per-channel sums of a map, computed by the kernel that wrote it (bf16.upsample_conv2d's interleave), kept on the
# tensor as an attribute: (sums (B, 2, C) float64 of x - K and (x - K)^2, shifts K (B, C) float32). Only fresh
# tensors of our own kernels carry it and diffusers' decoder never writes into them in place.
_SUMS = "_kl_channel_sums"


def attach_channel_sums(x: torch.Tensor, sums: torch.Tensor, shifts: torch.Tensor) -> None:
    setattr(x, _SUMS, (sums, shifts))


def attach_channel_moments(x: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
    """Per-channel mean and M2 = sum((x - mean)^2) (B, C) float64 as the shifted sums above: the shift is the
    mean rounded to float32, d = mean - shift, so sum(x - shift) = n d and sum((x - shift)^2) = M2 + n d^2."""
    n = x.shape[2] * x.shape[3]
    shifts = mean.float()  # (B, C)
    d = mean - shifts.double()
    attach_channel_sums(x, torch.stack([n * d, m2 + n * d * d], 1), shifts)  # (B, 2, C)


def _fold_channel_sums(norm: nn.GroupNorm, sums: torch.Tensor, shifts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) (B, C) float32 from per-channel shifted sums over n values each, as ``fold`` in C does:
    re-shifted to each group's first channel (float64, no E[x^2] - E[x]^2 cancellation)."""
    b, c = shifts.shape
    g = norm.num_groups
    s1, s2 = sums[:, 0].view(b, g, -1), sums[:, 1].view(b, g, -1)  # (B, G, C/G)
    k = shifts.double().view(b, g, -1)
    d = k - k[:, :, :1]  # channel shift - group shift
    t1 = (s1 + n * d).sum(2)  # (B, G): sum(x - K_group)
    t2 = (s2 + 2 * d * s1 + n * d * d).sum(2)
    m = t1 / (n * s1.shape[2])
    mean, var = k[:, :, 0] + m, (t2 / (n * s1.shape[2]) - m * m).clamp_min(0)
    rstd = (var + norm.eps).rsqrt()  # (B, G)
    gamma = norm.weight.detach().double().view(1, g, -1) if norm.affine else torch.ones(1, g, c // g, dtype=torch.float64)
    beta = norm.bias.detach().double().view(1, g, -1) if norm.affine else torch.zeros(1, g, c // g, dtype=torch.float64)
    a = gamma * rstd[:, :, None]
    return a.reshape(b, c).float(), (beta - mean[:, :, None] * a).reshape(b, c).float()


def norm_scale_shift(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of each image of ``x`` as a per-channel map ``x * scale + shift``: (B, C) float32 each."""
    lib, layout = library(), _layout(x)
    b, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    pre = getattr(x, _SUMS, None)
    if pre is not None and pre[1].shape == (b, c) and c % norm.num_groups == 0:
        return _fold_channel_sums(norm, *pre, hw)  # the writer's sums: no pass over x
    scale, shift = torch.empty(b, c, dtype=torch.float32), torch.empty(b, c, dtype=torch.float32)  # (B, C)
    gamma = norm.weight.detach().float().contiguous() if norm.affine else None
    beta = norm.bias.detach().float().contiguous() if norm.affine else None
    fn = lib.gn_affine_nchw if layout == "nchw" else lib.gn_affine_nhwc_bf16
    dims = (c, hw) if layout == "nchw" else (hw, c)
    for k in range(b):
        fn(x[k].data_ptr(), *dims, norm.num_groups, gamma.data_ptr() if gamma is not None else None,
           beta.data_ptr() if beta is not None else None, norm.eps, scale[k].data_ptr(), shift[k].data_ptr(),
           torch.get_num_threads())
    return scale, shift


def apply_scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool,
                      inplace: bool = False) -> torch.Tensor:
    """``silu?(x * scale + shift)`` per channel, in ``x``'s layout and dtype: a new tensor, or ``x`` overwritten
    (each value is read before it is written, by the same thread)."""
    lib, layout = library(), _layout(x)
    b, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    y = x if inplace else torch.empty_like(x)  # keeps channels_last for the bf16 layout
    if layout == "nhwc_bf16":
        return apply_scale_shift_into(x, y, scale, shift, silu)
    for k in range(b):
        lib.affine_nchw(x[k].data_ptr(), y[k].data_ptr(), scale[k].data_ptr(), shift[k].data_ptr(), c, hw, int(silu),
                        torch.get_num_threads())
    return y


def _rows_nhwc(x: torch.Tensor) -> bool:
    """bf16 (B, C, H, W) whose pixels are C contiguous channels, W pixels a row (a channels_last map or a view
    of rows inside a wider one, e.g. a padded map's interior), C a multiple of 16."""
    c = x.shape[1]
    return x.dtype == torch.bfloat16 and x.dim() == 4 and c % 16 == 0 and x.stride(1) == 1 and (x.stride(3) == c or x.shape[3] == 1)


def apply_scale_shift_into(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                           silu: bool) -> torch.Tensor:
    """``y = silu?(x * scale + shift)`` per channel for bf16 maps of rows of channels_last pixels (``x`` and
    ``y`` may be the same tensor, or views into wider maps); returns ``y``."""
    assert _rows_nhwc(x) and _rows_nhwc(y) and x.shape == y.shape
    b, c, h, w = x.shape
    for k in range(b):
        library().affine_nhwc_bf16(x[k].data_ptr(), x.stride(2), y[k].data_ptr(), y.stride(2), scale[k].data_ptr(),
                                   shift[k].data_ptr(), h, w, c, int(silu), torch.get_num_threads())
    return y


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True, inplace: bool = False) -> torch.Tensor:
    """``F.silu(norm(x))`` (or ``norm(x)``) in two passes, into ``x`` itself if ``inplace`` (the caller's
    temporary); the caller checks ``supported(norm, x)``."""
    return apply_scale_shift(x, *norm_scale_shift(norm, x), silu, inplace)


def fast_forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``GroupNorm.forward`` for CPU bf16 inference (``fastconv.optimize`` patches it in): channels_last maps and
    the (B, C, N) tokens of diffusers' Attention, whose memory is channels_last (C innermost), in our two passes
    (fp32 statistics) instead of eager GroupNorm's strided path (~15x slower on the SD mid block here). Anything
    else, and whenever fast paths are off, runs the class's forward."""
    if settings.fastconv_enabled() and x.dtype == torch.bfloat16 and x.dim() in (3, 4):
        x4 = x.unsqueeze(-1) if x.dim() == 3 else x  # (B, C, N, 1): channels_last when C is innermost
        if supported(self, x4) and _layout(x4) == "nhwc_bf16":
            y = group_norm_silu(self, x4, silu=False)
            return y.squeeze(-1) if x.dim() == 3 else y
    return nn.GroupNorm.forward(self, x)
