"""Fast CPU inference: Winograd F(6x6, 3x3) for the 3x3 stride-1 convolutions that dominate the VAE.

Why: on a CPU, diffusers' eager ``AutoencoderKL`` already runs its convolutions near oneDNN's
direct-convolution peak and ``torch.compile`` gains nothing, so the only way to go faster is to do
less arithmetic. ~90% of encode/decode time is 3x3 stride-1 convolutions; Winograd's algorithm
computes them with 5.06x fewer multiplications (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016): per 6x6 output tile, ``Y = A^T [(G g G^T) * (B^T d B)] A``.

How (measured in docs/benchmarks.md): the input/output tile transforms are two small C loops
(compiled once with the system ``gcc`` into ``~/.cache/kl_autoencoder``, OpenMP on torch's threads),
and the 64 per-frequency products ``(tiles, C_in) x (C_in, C_out)`` are one grouped 1x1 oneDNN
convolution on channels_last data with the transformed weights pre-packed once per layer (the
per-call weight reorder would otherwise cost as much as the products). Activations stay
channels_last between layers. Without ``gcc`` it falls back to NNPACK's Winograd
(``torch._nnpack_spatial_convolution``), then to eager.

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
import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import types
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

ENV_VAR = "KL_AUTOENCODER_FASTCONV"
MIN_CHANNELS = 16  # below this (conv_in 3->128, conv_out 128->3, 4->512) Winograd is not faster
TILE = 6  # output tile m of F(m x m, 3 x 3); 4 is also compiled (more accurate, 4x instead of 5.06x fewer multiplies)
BAND_BYTES = 48 << 20  # transformed tiles per band (V and M): big enough for GEMM efficiency, small enough to reuse memory
_CB = 16  # channels per inner C loop (one AVX-512 vector); Winograd needs C_in and C_out divisible by it
# Interpolation points (Lavin & Gray 2016; NNPACK/wincnn use the same): 0, +-1, +-2 (, +-1/2) and infinity.
_POINTS = {4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}

_state = threading.local()
_lock = threading.Lock()
_lib: list = []  # [ctypes.CDLL or None] once tried


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


# ----------------------------------------------------------------------------- Winograd transforms


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
    """C for the tile transforms of F(4,3) and F(6,3) on NHWC float data, C innermost (vectorised)."""
    def arr(a: torch.Tensor) -> str:
        return "{" + ",".join("{" + ",".join(f"{float(v)!r}f" for v in row) + "}" for row in a.tolist()) + "}"

    out = ["#include <string.h>"]
    for m in (4, 6):
        at, _, bt = winograd_matrices(m)
        t = m + 2
        # in: x (H, W, C) -> V (tiles of rows [i0, i1), t*t, C); rows/cols outside the image read as zero padding
        # out: M (tiles, t*t, C) -> y (H, W, C) + bias; outputs outside the image are skipped
        out.append(f"""
static const float BT{m}[{t}][{t}] = {arr(bt)};
static const float AT{m}[{m}][{t}] = {arr(at)};
void wino{m}_in(const float* x, float* V, long H, long W, long C, long nW, long i0, long i1, int nt) {{
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (long ij = i0 * nW; ij < i1 * nW; ij++) {{
    long i = ij / nW, j = ij % nW;
    float* vp = V + (ij - i0 * nW) * {t * t} * C;
    float d[{t}][{t}][{_CB}] __attribute__((aligned(64)));
    float tmp[{t}][{t}][{_CB}] __attribute__((aligned(64)));
    for (long c0 = 0; c0 < C; c0 += {_CB}) {{
      for (int k = 0; k < {t}; k++) {{
        long r = i * {m} - 1 + k;
        for (int l = 0; l < {t}; l++) {{
          long q = j * {m} - 1 + l;
          if (r >= 0 && r < H && q >= 0 && q < W) memcpy(d[k][l], x + (r * W + q) * C + c0, sizeof(d[k][l]));
          else memset(d[k][l], 0, sizeof(d[k][l]));
        }}
      }}
      for (int a = 0; a < {t}; a++) for (int l = 0; l < {t}; l++) for (int c = 0; c < {_CB}; c++) {{
        float s = 0.f;
        for (int k = 0; k < {t}; k++) s += BT{m}[a][k] * d[k][l][c];
        tmp[a][l][c] = s;
      }}
      for (int a = 0; a < {t}; a++) for (int b = 0; b < {t}; b++) {{
        float* o = vp + (a * {t} + b) * C + c0;
        for (int c = 0; c < {_CB}; c++) {{
          float s = 0.f;
          for (int l = 0; l < {t}; l++) s += BT{m}[b][l] * tmp[a][l][c];
          o[c] = s;
        }}
      }}
    }}
  }}
}}
void wino{m}_out(const float* M, float* y, const float* bias, long H, long W, long C, long nW, long i0, long i1, int nt) {{
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (long ij = i0 * nW; ij < i1 * nW; ij++) {{
    long i = ij / nW, j = ij % nW;
    const float* mp = M + (ij - i0 * nW) * {t * t} * C;
    float tmp[{m}][{t}][{_CB}] __attribute__((aligned(64)));
    for (long c0 = 0; c0 < C; c0 += {_CB}) {{
      for (int a = 0; a < {m}; a++) for (int l = 0; l < {t}; l++) for (int c = 0; c < {_CB}; c++) {{
        float s = 0.f;
        for (int k = 0; k < {t}; k++) s += AT{m}[a][k] * mp[(k * {t} + l) * C + c0 + c];
        tmp[a][l][c] = s;
      }}
      for (int a = 0; a < {m} && i * {m} + a < H; a++) for (int b = 0; b < {m} && j * {m} + b < W; b++) {{
        float* o = y + ((i * {m} + a) * W + j * {m} + b) * C + c0;
        for (int c = 0; c < {_CB}; c++) {{
          float s = bias ? bias[c0 + c] : 0.f;
          for (int l = 0; l < {t}; l++) s += AT{m}[b][l] * tmp[a][l][c];
          o[c] = s;
        }}
      }}
    }}
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
                for name in (f"wino{m}_in", f"wino{m}_out"):
                    fn = getattr(lib, name)
                    fn.restype = None
                    fn.argtypes = [ptr, ptr] + ([ptr] if name.endswith("out") else []) + [i64] * 6 + [ctypes.c_int]
        except (OSError, subprocess.SubprocessError):
            lib = None  # no compiler / no OpenMP: NNPACK or eager instead
        _lib.append(lib)
        return lib


def _prepacked_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _weights(conv: nn.Conv2d, m: int, rows: int, n_w: int):
    """Transformed weights ``G g G^T`` as a grouped 1x1 kernel (t*t*C_out, C_in, 1, 1), oneDNN-packed for a band shape.

    Cached on the module (not a parameter or buffer: the state dict is unchanged); rebuilt when the
    weight tensor is replaced or modified in place (its data pointer or version counter changes).
    """
    w = conv.weight
    key = (w.data_ptr(), w._version, m)
    cache = conv.__dict__.get("_fastconv_cache")
    if cache is None or cache["key"] != key:
        _, g, _ = winograd_matrices(m)
        u = torch.einsum("ak,oikl,bl->aboi", g, w.detach().double(), g)  # (t, t, C_out, C_in)
        t2, (co, ci) = (m + 2) ** 2, w.shape[:2]
        cache = {"key": key, "u": u.reshape(t2 * co, ci, 1, 1).float().contiguous(), "packed": {}}
        conv.__dict__["_fastconv_cache"] = cache
    shape = (rows, n_w)
    if shape not in cache["packed"] and _prepacked_ok():
        t2, ci = (m + 2) ** 2, w.shape[1]
        cache["packed"][shape] = torch.ops.mkldnn._reorder_convolution_weight(
            cache["u"], [0, 0], [1, 1], [1, 1], t2, [1, t2 * ci, rows, n_w])
    return cache["u"], cache["packed"].get(shape)


def winograd_conv2d(conv: nn.Conv2d, x: torch.Tensor, m: int = TILE) -> torch.Tensor:
    """``conv(x)`` for a 3x3, stride-1, padding-1 conv by Winograd F(m x m, 3 x 3); (B, C_out, H, W) channels_last."""
    lib = winograd_library()
    b, ci, h, w = x.shape
    co, t2 = conv.out_channels, (m + 2) ** 2
    n_h, n_w = -(-h // m), -(-w // m)
    # equal bands of tile rows (the last one padded with zero rows): one packed weight and one oneDNN primitive
    bands = max(1, -(-(n_h * n_w * t2 * max(ci, co) * 4) // BAND_BYTES))
    rows = -(-n_h // bands)
    u, packed = _weights(conv, m, rows, n_w)
    x = x.contiguous(memory_format=torch.channels_last)  # (B, C_in, H, W) stored (B, H, W, C_in)
    y = torch.empty(b, co, h, w, memory_format=torch.channels_last)  # (B, C_out, H, W)
    v = torch.empty(rows * n_w * t2 * ci)  # transformed input tiles of one band, (tiles, t*t, C_in)
    bias = conv.bias.detach().contiguous() if conv.bias is not None else None
    nt = torch.get_num_threads()
    f_in, f_out = getattr(lib, f"wino{m}_in"), getattr(lib, f"wino{m}_out")
    for k in range(b):
        xp, yp = x.data_ptr() + k * h * w * ci * 4, y.data_ptr() + k * h * w * co * 4
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
        if self.in_channels % _CB == 0 and self.out_channels % _CB == 0 and winograd_library() is not None:
            return winograd_conv2d(self, x)  # (B, O, H, W) channels_last
        if nnpack_available():
            # NNPACK reads NCHW-contiguous input; channels_last input would be copied anyway
            return torch._nnpack_spatial_convolution(x.contiguous(), w, self.bias, [1, 1], [1, 1])  # (B, O, H, W)
    return nn.Conv2d.forward(self, x)


def optimize(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Patch the eligible Conv2d modules of ``model`` in place to run Winograd on CPU; returns ``model``.

    Only each module's ``forward`` is replaced (an instance attribute): parameters, buffers and the
    state dict are unchanged, so saving, exporting and training behave as before. ``enabled=False``
    (or ``KL_AUTOENCODER_FASTCONV=0``, or neither the C kernels nor NNPACK usable) removes the patches.
    """
    on = enabled and env_enabled() and (winograd_library() is not None or nnpack_available())
    for m in model.modules():
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
