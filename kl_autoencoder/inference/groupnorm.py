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
(round to nearest even).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn as nn

from .cbuild import PRELUDE, build

_SOURCE = PRELUDE + r"""
typedef uint16_t u16v __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32v __attribute__((vector_size(64), aligned(64)));
static inline v16 bf16_load(const uint16_t* p) {
  return (v16)(__builtin_convertvector(*(const u16v*)p, u32v) << 16);
}
static inline void bf16_store(uint16_t* p, v16 v) {   /* round to nearest even, as torch's .to(bfloat16) */
  u32v b = (u32v)v;
  b = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  *(u16v*)p = __builtin_convertvector(b, u16v);
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
    for (long p0 = 0; p0 < HW; p0 += 64) {  /* 64 pixels (<= 64 KiB) per chunk, one vector of channels at a time */
      long p1 = p0 + 64 < HW ? p0 + 64 : HW;
      for (long j = 0; j < nv; j++) {
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
void affine_nhwc_bf16(const uint16_t* x, uint16_t* y, const float* scale, const float* shift, long HW, long C, int silu, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (long p = 0; p < HW; p++)
    for (long c = 0; c < C; c += 16) {
      v16 v = bf16_load(x + p * C + c) * vload(scale + c) + vload(shift + c);
      bf16_store(y + p * C + c, silu ? vsilu(v) : v);
    }
}
"""


@functools.cache  # called per norm: hashing the source each time cost ~12 us
def library() -> ctypes.CDLL | None:
    i64, ptr, f32, i32 = ctypes.c_long, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    stats = (None, [ptr, i64, i64, i64, ptr, ptr, f32, ptr, ptr, i32])
    apply = (None, [ptr, ptr, ptr, ptr, i64, i64, i32, i32])
    return build("groupnorm", _SOURCE, {"gn_affine_nchw": stats, "gn_affine_nhwc_bf16": stats,
                                         "affine_nchw": apply, "affine_nhwc_bf16": apply})


def _layout(x: torch.Tensor) -> str | None:
    """"nchw" (float32, contiguous), "nhwc_bf16" (bfloat16, channels_last, C % 16 == 0) or None (not handled)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return None
    if x.dtype == torch.float32 and x.is_contiguous():
        return "nchw"
    if x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] % 16 == 0:
        return "nhwc_bf16"
    return None


def supported(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether these kernels handle ``norm(x)``: an ``nn.GroupNorm`` whose forward is not overridden
    (``tiling_approx`` patches norms with fixed statistics), on a layout of ``_layout``, without autograd."""
    return (
        type(norm) is nn.GroupNorm
        and "forward" not in norm.__dict__
        and _layout(x) is not None
        and not (torch.is_grad_enabled() and x.requires_grad)
        and library() is not None
    )


def norm_scale_shift(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of each image of ``x`` as a per-channel map ``x * scale + shift``: (B, C) float32 each."""
    lib, layout = library(), _layout(x)
    b, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
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


def apply_scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool) -> torch.Tensor:
    """``silu?(x * scale + shift)`` per channel, a new tensor in ``x``'s layout and dtype."""
    lib, layout = library(), _layout(x)
    b, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    y = torch.empty_like(x)  # keeps channels_last for the bf16 layout
    fn = lib.affine_nchw if layout == "nchw" else lib.affine_nhwc_bf16
    dims = (c, hw) if layout == "nchw" else (hw, c)
    for k in range(b):
        fn(x[k].data_ptr(), y[k].data_ptr(), scale[k].data_ptr(), shift[k].data_ptr(), *dims, int(silu), torch.get_num_threads())
    return y


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True) -> torch.Tensor:
    """``F.silu(norm(x))`` (or ``norm(x)``) in two passes; the caller checks ``supported(norm, x)``."""
    return apply_scale_shift(x, *norm_scale_shift(norm, x), silu)
