"""Winograd F(m x m, 3 x 3) convolution on CPU: exact transform matrices, C tile transforms, packed GEMMs.

Per m x m output tile, ``Y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): F(6,3) does 5.06x fewer multiplications than direct 3x3.
The input/output tile transforms are two small C loops (generated here, compiled once with the
system ``gcc`` into ``~/.cache/kl_autoencoder``, OpenMP on torch's threads); the 64 per-frequency
products ``(tiles, C_in) x (C_in, C_out)`` are one grouped 1x1 oneDNN convolution with the transformed
weights pre-packed once per layer (the per-call weight reorder would otherwise cost as much as the
products). Data stays NCHW in and out. When to use it instead of NNPACK or eager: ``fastconv.py``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TILE = 6  # output tile m of F(m x m, 3 x 3); 4 is also compiled (more accurate, 4x instead of 5.06x fewer multiplies)
BAND_BYTES = 48 << 20  # transformed tiles per band (V and M): big enough for GEMM efficiency, small enough to reuse memory
CHANNEL_BLOCK = 16  # channels per inner C loop (one AVX-512 vector); C_in and C_out must be divisible by it
# Interpolation points (Lavin & Gray 2016; NNPACK/wincnn use the same): 0, +-1, +-2 (, +-1/2) and infinity.
_POINTS = {4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}

_lock = threading.Lock()
_lib: list = []  # [ctypes.CDLL or None] once tried


def winograd_matrices(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T (m, t), G (t, 3), B^T (t, t)) of F(m, 3), t = m + 2, exact in float64 (Cook-Toom / wincnn construction)."""
    p = [Fraction(v) for v in _POINTS[m]]
    n = m + 2

    def poly(roots):  # coefficients, low -> high, of prod (x - r)
        c = [Fraction(1)]
        for r in roots:
            c = [Fraction(0)] + c
            for k in range(len(c) - 1):
                c[k] -= r * c[k + 1]
        return c

    f = [Fraction(1)] * (n - 1)  # f_j = prod_{l != j} (p_j - p_l)
    for j in range(n - 1):
        for l in range(n - 1):
            if l != j:
                f[j] *= p[j] - p[l]
    at = [[p[j] ** i for j in range(n - 1)] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = [[p[j] ** k / f[j] for k in range(3)] for j in range(n - 1)] + [[0, 0, 1]]
    bt = [(c + [0] * n)[:n] for c in (poly([p[l] for l in range(n - 1) if l != j]) for j in range(n - 1))]
    bt.append(poly(p))
    return tuple(torch.tensor([[float(v) for v in row] for row in a], dtype=torch.float64) for a in (at, g, bt))


def _c_source() -> str:
    """C for the tile transforms of F(4,3) and F(6,3) on NCHW float data, 16 channels per vectorised inner loop."""
    def arr(a: torch.Tensor) -> str:
        return "{" + ",".join("{" + ",".join(f"{float(v)!r}f" for v in row) + "}" for row in a.tolist()) + "}"

    out = ["#include <stdlib.h>", "#include <string.h>"]
    for m in (4, 6):
        at, _, bt = winograd_matrices(m)
        t = m + 2
        out.append(f"""
static const float BT{m}[{t}][{t}] = {arr(bt)};
static const float AT{m}[{m}][{t}] = {arr(at)};
""")
        # in: x (C, H, W) -> V (tiles of rows [i0, i1), t*t, C); rows/cols outside the image read as zero padding
        # out: M (tiles, t*t, C) -> y (C, H, W) + bias; outputs outside the image are skipped
        # Both stage a band's rows of 16 channels in a (row, col, 16) buffer, so that x/y are read and
        # written as contiguous rows (gathering 16 channels per pixel directly thrashed the TLB: 4-10x slower)
        out.append(f"""
void wino{m}_in_nchw(const float* x, float* V, long H, long W, long C, long nW, long i0, long i1, int nt) {{
  long Wp = nW * {m} + 2;
  #pragma omp parallel num_threads(nt)
  {{
    float* st = (float*)aligned_alloc(64, {t} * Wp * {CHANNEL_BLOCK} * sizeof(float));
    float tmp[{t}][{t}][{CHANNEL_BLOCK}] __attribute__((aligned(64)));
    #pragma omp for schedule(static)
    for (long i = i0; i < i1; i++) {{
      for (long c0 = 0; c0 < C; c0 += {CHANNEL_BLOCK}) {{
        memset(st, 0, {t} * Wp * {CHANNEL_BLOCK} * sizeof(float));
        for (int k = 0; k < {t}; k++) {{
          long r = i * {m} - 1 + k;
          if (r < 0 || r >= H) continue;
          for (int c = 0; c < {CHANNEL_BLOCK}; c++) {{
            const float* row = x + ((c0 + c) * H + r) * W;
            float* s = st + (k * Wp + 1) * {CHANNEL_BLOCK} + c;
            for (long q = 0; q < W; q++) s[q * {CHANNEL_BLOCK}] = row[q];
          }}
        }}
        for (long j = 0; j < nW; j++) {{
          float* vp = V + ((i - i0) * nW + j) * {t * t} * C + c0;
          for (int a = 0; a < {t}; a++) for (int l = 0; l < {t}; l++) for (int c = 0; c < {CHANNEL_BLOCK}; c++) {{
            float s = 0.f;
            for (int k = 0; k < {t}; k++) s += BT{m}[a][k] * st[(k * Wp + j * {m} + l) * {CHANNEL_BLOCK} + c];
            tmp[a][l][c] = s;
          }}
          for (int a = 0; a < {t}; a++) for (int b = 0; b < {t}; b++) {{
            float* o = vp + (a * {t} + b) * C;
            for (int c = 0; c < {CHANNEL_BLOCK}; c++) {{
              float s = 0.f;
              for (int l = 0; l < {t}; l++) s += BT{m}[b][l] * tmp[a][l][c];
              o[c] = s;
            }}
          }}
        }}
      }}
    }}
    free(st);
  }}
}}
void wino{m}_out_nchw(const float* M, float* y, const float* bias, long H, long W, long C, long nW, long i0, long i1, int nt) {{
  long Wp = nW * {m};
  #pragma omp parallel num_threads(nt)
  {{
    float* st = (float*)aligned_alloc(64, {m} * Wp * {CHANNEL_BLOCK} * sizeof(float));
    float tmp[{m}][{t}][{CHANNEL_BLOCK}] __attribute__((aligned(64)));
    #pragma omp for schedule(static)
    for (long i = i0; i < i1; i++) {{
      for (long c0 = 0; c0 < C; c0 += {CHANNEL_BLOCK}) {{
        for (long j = 0; j < nW; j++) {{
          const float* mp = M + ((i - i0) * nW + j) * {t * t} * C + c0;
          for (int a = 0; a < {m}; a++) for (int l = 0; l < {t}; l++) for (int c = 0; c < {CHANNEL_BLOCK}; c++) {{
            float s = 0.f;
            for (int k = 0; k < {t}; k++) s += AT{m}[a][k] * mp[(k * {t} + l) * C + c];
            tmp[a][l][c] = s;
          }}
          for (int a = 0; a < {m}; a++) for (int b = 0; b < {m}; b++) {{
            float* o = st + (a * Wp + j * {m} + b) * {CHANNEL_BLOCK};
            for (int c = 0; c < {CHANNEL_BLOCK}; c++) {{
              float s = bias ? bias[c0 + c] : 0.f;
              for (int l = 0; l < {t}; l++) s += AT{m}[b][l] * tmp[a][l][c];
              o[c] = s;
            }}
          }}
        }}
        for (int a = 0; a < {m} && i * {m} + a < H; a++)
          for (int c = 0; c < {CHANNEL_BLOCK}; c++) {{
            float* row = y + ((c0 + c) * H + i * {m} + a) * W;
            const float* s = st + a * Wp * {CHANNEL_BLOCK} + c;
            for (long q = 0; q < W; q++) row[q] = s[q * {CHANNEL_BLOCK}];
          }}
      }}
    }}
    free(st);
  }}
}}""")
    return "\n".join(out) + "\n"


def _cpu_flags() -> str:
    try:
        return next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:  # pragma: no cover - non-Linux
        return ""


def winograd_library():
    """The compiled transform kernels (ctypes.CDLL), building them on first use; None without gcc/OpenMP."""
    with _lock:
        if _lib:
            return _lib[0]
        src = _c_source()
        flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]  # -march=native: key includes CPU flags
        key = hashlib.sha256((src + " ".join(flags) + _cpu_flags()).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kl_autoencoder"
        so = cache / f"winograd_{key}.so"
        lib = None
        try:
            if not so.exists():
                cache.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cache) as tmp:
                    (Path(tmp) / "w.c").write_text(src)
                    subprocess.run(["gcc", *flags, "w.c", "-o", "w.so"], cwd=tmp, check=True, capture_output=True, timeout=120)
                    os.replace(Path(tmp) / "w.so", so)  # atomic: a parallel process sees all or nothing
            lib = ctypes.CDLL(str(so))
            i64, ptr = ctypes.c_long, ctypes.c_void_p
            for m in (4, 6):
                for name in (f"wino{m}_in_nchw", f"wino{m}_out_nchw"):
                    fn = getattr(lib, name)
                    fn.restype = None
                    fn.argtypes = [ptr, ptr] + ([ptr] if "_out" in name else []) + [i64] * 6 + [ctypes.c_int]
        except (OSError, subprocess.SubprocessError):
            lib = None  # no compiler / no OpenMP: NNPACK or eager instead
        _lib.append(lib)
        return lib


class _Cache(dict):
    """Per-module transformed weights; copies and pickles as empty (rebuilt on next use; oneDNN-packed tensors can't be)."""

    def __deepcopy__(self, memo) -> "_Cache":
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def _prepacked_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _weights(conv: nn.Conv2d, m: int, rows: int, n_w: int):
    """Transformed weights ``G g G^T`` as a grouped 1x1 kernel (t*t*C_out, C_in, 1, 1), oneDNN-packed for a band shape.

    Cached on the module (not a parameter or buffer: the state dict is unchanged); rebuilt when the
    weight tensor is replaced or modified in place (its data pointer or version counter changes).
    """
    w = conv.weight
    key = (w.data_ptr(), None if w.is_inference() else w._version, m)  # inference tensors have no version counter
    cache = conv.__dict__.get("_fastconv_cache")
    if not cache or cache["key"] != key:
        cache = _Cache(key=key, u=None, packed={})
        conv.__dict__["_fastconv_cache"] = cache
    shape, t2, (co, ci) = (rows, n_w), (m + 2) ** 2, w.shape[:2]
    if shape in cache["packed"]:
        return None, cache["packed"][shape]
    u = cache["u"]
    if u is None:
        _, g, _ = winograd_matrices(m)
        u = (g @ w.detach().double() @ g.T).float()  # (C_out, C_in, t, t) = G g G^T, rounded once
        u = u.permute(2, 3, 0, 1).reshape(t2 * co, ci, 1, 1).contiguous()  # group a*t+b: (C_out, C_in)
    if not _prepacked_ok():
        cache["u"] = u
        return u, None
    # only one packed copy is kept, for the latest band shape (t*t/9 = 7.1x the weight's size: memory
    # cost in docs/benchmarks.md); another image size repacks (~0.1 s per 512-channel layer)
    cache["packed"] = {shape: torch.ops.mkldnn._reorder_convolution_weight(u, [0, 0], [1, 1], [1, 1], t2, [1, t2 * ci, rows, n_w])}
    return None, cache["packed"][shape]


def winograd_conv2d(conv: nn.Conv2d, x: torch.Tensor, m: int = TILE) -> torch.Tensor:
    """``conv(x)`` for a 3x3, stride-1, padding-1 conv by Winograd F(m x m, 3 x 3); (B, C_out, H, W) NCHW.

    NCHW in and out, like eager: the rest of the model stays in the layout it runs fastest in
    (PyTorch's channels_last GroupNorm is 2x slower here, and mixed-layout adds 1.7x slower).
    """
    lib = winograd_library()
    b, ci, h, w = x.shape
    co, t2 = conv.out_channels, (m + 2) ** 2
    n_h, n_w = -(-h // m), -(-w // m)
    # equal bands of tile rows (the last one padded with zero rows): one packed weight and one oneDNN primitive
    bands = max(1, -(-(n_h * n_w * t2 * max(ci, co) * 4) // BAND_BYTES))
    rows = -(-n_h // bands)
    u, packed = _weights(conv, m, rows, n_w)
    x = x.contiguous()  # (B, C_in, H, W)
    y = torch.empty(b, co, h, w)  # (B, C_out, H, W)
    v = torch.empty(rows * n_w * t2 * ci)  # transformed input tiles of one band, (tiles, t*t, C_in)
    bias = conv.bias.detach().contiguous() if conv.bias is not None else None
    nt = torch.get_num_threads()
    f_in, f_out = getattr(lib, f"wino{m}_in_nchw"), getattr(lib, f"wino{m}_out_nchw")
    for k in range(b):
        xp, yp = x.data_ptr() + k * x.stride(0) * 4, y.data_ptr() + k * y.stride(0) * 4
        for i0 in range(0, bands * rows, rows):
            f_in(xp, v.data_ptr(), h, w, ci, n_w, i0, i0 + rows, nt)
            v4 = v.as_strided((1, t2 * ci, rows, n_w), (v.numel(), 1, n_w * t2 * ci, t2 * ci))  # channels_last view
            if packed is not None:
                mm = torch.ops.mkldnn._convolution_pointwise(v4, packed, None, [0, 0], [1, 1], [1, 1], t2, "none", [], "")
            else:
                mm = F.conv2d(v4, u, groups=t2)
            mm = mm.contiguous(memory_format=torch.channels_last)  # (1, t*t*C_out, rows, nW) = (tiles, t*t, C_out)
            f_out(mm.data_ptr(), yp, bias.data_ptr() if bias is not None else None, h, w, co, n_w, i0, i0 + rows, nt)
    return y
