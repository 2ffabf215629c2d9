"""Winograd F(m x m, 3 x 3) convolution on CPU, fp32: exact transform matrices, one fused C kernel.

Per m x m output tile, ``Y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): F(6,3) does 5.06x fewer multiplications than direct 3x3.

The kernel (C in ``winograd_kernels.py``, generated from the matrices here, built by ``cbuild.py``) works
on a block of tiles at a time (``block_shape``: L2-sized, or bands of whole tile rows where the weights fit
the last-level cache), so that one frequency's transformed input ``V[f]`` (T, C_in) and products ``M[f]``
(T, C_out) stay in the core's L2 cache: input transform (16 channels per vector, straight-line code with
the matrices' constants folded in), then the t*t products ``V[f] @ U[f]`` with a 6 x 64 register-
blocked micro-kernel, then the output transform writing NCHW rows (plus a residual, plus the rows'
GroupNorm statistics, on request). Earlier versions transformed a band of 48 MB and ran the products
through oneDNN: the transformed tiles went to memory and back twice, so at 128-256 channels the
transforms cost as much as the products (docs/benchmarks.md).

The input staging can also apply, per channel, ``silu(x * scale + shift)`` (a GroupNorm with its
statistics, then SiLU: ``groupnorm.py``), so the normalised map is never written to memory. A second
build, F(7 x 7, 2 x 2), runs an upsampler's four 2x2 sub-pixel convolutions on the low-resolution map
(``winograd_upsample_conv2d``, ``subpixel.py``). When to use these instead of NNPACK or eager:
``fastconv.py``.
"""

from __future__ import annotations

import ctypes
import functools
from fractions import Fraction

import torch
import torch.nn as nn

from . import groupnorm
from .cbuild import build, last_level_cache_bytes
from .packed_cache import PackedCache, weight_key
from .subpixel import subpixel_weights
from .winograd_kernels import c_source

TILE = 6  # output tile m of F(m x m, 3 x 3); 4 is also compiled (more accurate, 4x instead of 5.06x fewer multiplies)
CHANNEL_BLOCK = 16  # channels per vector (one AVX-512 register); C_in and C_out must be divisible by it
BLOCK_BYTES = 3 << 19  # V + M of one block of tiles (1.5 MiB): within a core's L2 (2 MiB here, 1 MiB on Zen 4/5) ...
MIN_BLOCK_TILES = 12  # ... but at least this many tiles, and C_in * C_out / WEIGHT_REUSE: each block streams all
WEIGHT_REUSE = 2048  # t*t*C_in*C_out transformed weights from L3 (512 channels: 64 MiB)
ROWS = 6  # tiles per micro-kernel call (register block 6 x 64 outputs: 24 accumulators)
# Where the transformed weights fit in a quarter of the last-level cache (this Xeon: 480 MB of L3), blocks are
# instead bands of whole tile rows: one frequency's V + M rows within ROW_BAND_BYTES, at least C_in * C_out /
# BAND_WEIGHT_REUSE tiles (each block still streams all weights), as many blocks per thread as the rows allow.
ROW_BAND_BYTES = 180 << 10
BAND_WEIGHT_REUSE = 12288
# Interpolation points by tile size t = m + r - 1 (Lavin & Gray 2016; NNPACK/wincnn use the same): 0, +-1, +-2
# (, +-1/2) and infinity. F(6,3) and F(7,2) share the 8-point tile.
_POINTS = {6: (0, 1, -1, 2, -2), 8: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}
SUBPIXEL_TILE = 7  # F(7 x 7, 2 x 2) for the upsampler's sub-pixel convolutions (8 x 8 tiles like F(6,3))


def winograd_matrices(m: int, r: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T (m, t), G (t, r), B^T (t, t)) of F(m, r), t = m + r - 1, exact in float64 (Cook-Toom / wincnn
    construction)."""
    n = m + r - 1
    p = [Fraction(v) for v in _POINTS[n]]

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
    g = [[p[j] ** k / f[j] for k in range(r)] for j in range(n - 1)] + [[0] * (r - 1) + [1]]
    bt = [(c + [0] * n)[:n] for c in (poly([p[l] for l in range(n - 1) if l != j]) for j in range(n - 1))]
    bt.append(poly(p))
    return tuple(torch.tensor([[float(v) for v in row] for row in a], dtype=torch.float64) for a in (at, g, bt))


def _c_source() -> str:
    specs = [(m, r, *winograd_matrices(m, r)[::2]) for m, r in ((4, 3), (6, 3), (SUBPIXEL_TILE, 2))]  # (m, r, A^T, B^T)
    return c_source(specs)


@functools.cache  # called per conv: the source (about 18 KB, exact fractions) is generated and hashed once
def winograd_library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, ``cbuild.py``); None without gcc/OpenMP."""
    i64, ptr = ctypes.c_long, ctypes.c_void_p
    sig = (None, [ptr] * 8 + [ctypes.c_int] + [i64] * 4 + [i64, i64, i64, ctypes.c_int])
    return build("winograd", _c_source(), {f"wino{m}_conv": sig for m in (4, 6, SUBPIXEL_TILE)})


def packed_weights(conv: nn.Conv2d, m: int, subpixel: bool = False) -> torch.Tensor:
    """``G g G^T`` as (t*t, C_out/64 blocks of (C_in, 64)), the layout the micro-kernel streams; with
    ``subpixel``, of the conv's four 2x2 sub-pixel kernels (``subpixel_weights``: 4 C_out outputs, F(m, 2)).

    Cached on the module (not a parameter or buffer: the state dict is unchanged); rebuilt when the
    weight tensor is replaced or modified in place (its data pointer or version counter changes).
    t*t/9 = 7.1x the size of the weight (memory cost in docs/benchmarks.md); 4 x 64/9 = 28x for ``subpixel``.
    """
    w = conv.weight
    key = (*weight_key(w), m, subpixel)
    cache = conv.__dict__.get("_fastconv_cache")
    if cache and cache["key"] == key:
        return cache["u"]
    g = winograd_matrices(m, 2 if subpixel else 3)[1]  # (t, r)
    k = w.detach().double()  # (C_out, C_in, 3, 3)
    if subpixel:  # (4 C_out, C_in, 2, 2), phase-major -> groups of 16 channels x 4 phases (the kernel's order)
        k = subpixel_weights(w, torch.float64).unflatten(0, (4, -1, 16)).transpose(0, 1).flatten(0, 2)
    co, ci, t = k.shape[0], k.shape[1], g.shape[0]
    u = (g @ k @ g.T).float()  # (C_out, C_in, t, t) = G g G^T, rounded once
    u = u.permute(2, 3, 1, 0).reshape(t * t, ci, co)  # (t*t, C_in, C_out)
    blocks = [u[:, :, n0 : n0 + 64].reshape(t * t, -1) for n0 in range(0, co, 64)]  # each (t*t, C_in * w)
    u = torch.cat(blocks, 1).contiguous()  # (t*t, C_out * C_in)
    conv.__dict__["_fastconv_cache"] = PackedCache(key=key, u=u)
    return u


def block_shape(h: int, w: int, ci: int, co: int, threads: int, m: int = TILE) -> tuple[int, int, int]:
    """(tile rows, tile columns, output-channel parts) per work item of the kernel.

    A block's V + M should stay within BLOCK_BYTES (L2), but every block streams all t*t*C_in*C_out
    transformed weights, so it gets at least MIN_BLOCK_TILES tiles and C_in*C_out/WEIGHT_REUSE (512
    channels: 128 tiles). Narrow images take whole tile rows; when there are fewer blocks than 2 per
    thread, the output channels are split instead (64 at least per part)."""
    n_h, n_w = -(-h // m), -(-w // m)
    tt = (8 if m == SUBPIXEL_TILE else m + 2) ** 2  # t*t: F(m, 3), or F(7, 2)
    if tt * ci * co * 4 <= last_level_cache_bytes() // 4:  # the transformed weights stay in the last-level cache
        bands = _row_bands(n_h, n_w, ci, co, threads)
        if bands is not None:
            return bands
    tiles = max(MIN_BLOCK_TILES, ci * co // WEIGHT_REUSE, BLOCK_BYTES // (tt * 4 * (ci + co)))
    cols = min(n_w, tiles)
    rows = min(n_h, max(1, tiles // cols))
    blocks = -(-n_h // rows) * -(-n_w // cols)
    parts = 1 if threads == 1 or blocks >= 2 * threads else min(-(-co // 64), -(-2 * threads // blocks))
    return rows, cols, parts


def _row_bands(n_h: int, n_w: int, ci: int, co: int, threads: int) -> tuple[int, int, int] | None:
    """Bands of whole tile rows (see ROW_BAND_BYTES): of the row counts allowed, the one whose blocks split most
    evenly between threads, the smaller on a tie; None when fewer than 2 blocks per thread would remain.
    Measured here (SD, 2 threads), against the L2-sized blocks: 128 ch at 512 px 103 -> 84 ms, 256 at 256
    73 -> 65, 512 at 128 67 -> 59, 512 at 64 23 -> 16 (docs/benchmarks.md)."""
    r_min = max(1, -(-(ci * co // BAND_WEIGHT_REUSE) // n_w))
    r_max = max(r_min, ROW_BAND_BYTES // (n_w * (ci + co) * 4))
    best = None
    for r in range(r_min, min(r_max, n_h) + 1):
        blocks = -(-n_h // r)
        if blocks < 2 * threads:
            break
        spread = -(-blocks // threads) * threads / blocks  # >= 1: the busiest thread's share over the mean
        if best is None or spread < best[0]:
            best = (spread, r)
    return (best[1], n_w, 1) if best else None


def winograd_conv2d(
    conv: nn.Conv2d,
    x: torch.Tensor,
    m: int = TILE,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    add_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stats: bool = False,
) -> torch.Tensor:
    """``conv(pre(x))`` for a 3x3, stride-1, padding-1 conv by Winograd F(m x m, 3 x 3); (B, C_out, H, W) NCHW.

    ``pre``: per channel ``x * scale + shift`` (``scale``/``shift`` (B, C_in) float32, or None), then
    SiLU if ``silu``; applied while staging the input.
    ``add_bias`` (C_out,): added to the conv's bias (a following per-channel addition, at no cost).
    ``residual`` (B, C_out, H, W): added as the output is written (``conv(x) + residual``, the same sums as an
    ``add_`` afterwards, without its pass over both maps).
    ``stats``: each image's per-channel mean and M2 of the output, computed from the rows just written, attached
    to it for the next GroupNorm (``groupnorm.attach_channel_moments``): its statistics pass is saved.
    NCHW in and out, like eager: the rest of the model stays in the layout it runs fastest in.
    """
    lib = winograd_library()
    b, ci, h, w = x.shape
    co = conv.out_channels
    u = packed_weights(conv, m)
    x = x.contiguous()  # (B, C_in, h, w)
    y = torch.empty(b, co, h, w, dtype=torch.float32)  # (B, C_out, H, W)
    bias = conv.bias.detach().contiguous() if conv.bias is not None else None
    if add_bias is not None:
        bias = (add_bias.detach().float() + (bias if bias is not None else 0)).contiguous()  # (C_out,)
    if scale is not None:
        scale, shift = scale.float().contiguous(), shift.float().contiguous()  # (B, C_in) each
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"residual of shape {tuple(residual.shape)} for a conv output of {tuple(y.shape)}")
        residual = residual.float().contiguous()  # (B, C_out, H, W)
    moments = torch.zeros(b, 3, co, dtype=torch.float64) if stats else None  # (B, [count, mean, M2], C_out)
    fn = getattr(lib, f"wino{m}_conv")
    nt = torch.get_num_threads()
    for k in range(b):
        fn(x[k].data_ptr(), u.data_ptr(), bias.data_ptr() if bias is not None else None, y[k].data_ptr(),
           residual[k].data_ptr() if residual is not None else None,
           moments[k].data_ptr() if moments is not None else None,
           scale[k].data_ptr() if scale is not None else None, shift[k].data_ptr() if scale is not None else None,
           int(silu), h, w, ci, co, *block_shape(h, w, ci, co, nt, m), nt)
    if moments is not None:
        groupnorm.attach_channel_moments(y, moments[:, 1], moments[:, 2])
    return y


def winograd_upsample_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, padding-1 conv, fp32:
    (B, C_out, 2h, 2w) NCHW. Four 2x2 sub-pixel convolutions on the low-resolution map (one per output
    phase, ``subpixel_weights``) by Winograd F(7,2) in one kernel: 4 x 64/49 = 5.2 products per
    low-resolution pixel and channel pair instead of 4 x 64/36 = 7.1 for F(6,3) on the 2x map, and the
    input transformed at low resolution; each phase's rows are written straight into the 2x map."""
    lib = winograd_library()
    b, ci, h, w = x.shape
    co, m = conv.out_channels, SUBPIXEL_TILE
    u = packed_weights(conv, m, subpixel=True)
    x = x.contiguous()  # (B, C_in, h, w)
    y = torch.empty(b, co, 2 * h, 2 * w, dtype=torch.float32)  # (B, C_out, 2h, 2w)
    # (4 C_out,): groups of 16 channels x 4 phases, each phase's the conv's bias
    bias = conv.bias.detach().view(-1, 1, 16).expand(-1, 4, 16).reshape(-1).contiguous() if conv.bias is not None else None
    nt = torch.get_num_threads()
    shape = subpixel_block_shape(h + 1, w + 1, ci, 4 * co, nt)
    for k in range(b):  # the phases' outputs: (h + 1, w + 1), phase (a, b) at rows a .. a + h - 1, cols b .. b + w - 1
        lib.wino7_conv(x[k].data_ptr(), u.data_ptr(), bias.data_ptr() if bias is not None else None, y[k].data_ptr(),
                       None, None, None, None, 0, h + 1, w + 1, ci, 4 * co, *shape, nt)
    return y


def subpixel_block_shape(h: int, w: int, ci: int, co: int, threads: int) -> tuple[int, int, int]:
    """``block_shape`` for the F(7,2) sub-pixel kernel (``co`` = 4 C_out): where that splits the channels of one
    whole-image block between threads (each part then transforms the whole input again), whole-width row
    bands, 2 per thread, when they still hold 64 tiles (measured, SD decoder, 512 ch at 128 px: 203 vs 227 ms;
    at 64 px bands of 30 tiles were slower than the split, 75 vs 60 ms)."""
    rows, cols, parts = block_shape(h, w, ci, co, threads, SUBPIXEL_TILE)
    n_h, n_w = -(-h // SUBPIXEL_TILE), -(-w // SUBPIXEL_TILE)
    band = -(-n_h // (2 * threads))
    if parts > 1 and band * n_w >= 64:
        return band, n_w, 1
    return rows, cols, parts
