"""Winograd F(m x m, 3 x 3) convolution on CPU, fp32: exact transform matrices, one fused C kernel.

Per m x m output tile, ``Y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): F(6,3) does 5.06x fewer multiplications than direct 3x3.

The kernel (C generated here, built by ``cbuild.py``) works on a strip of ``T`` tiles of one tile row
at a time, so that the strip's transformed input ``V`` (t*t, T, C_in) and products ``M`` (t*t, T,
C_out) stay in the core's L2 cache: input transform (16 channels per vector, straight-line code with
the matrices' constants folded in), then the t*t products ``V[f] @ U[f]`` with a 6 x 64 register-
blocked micro-kernel, then the output transform writing NCHW rows. Earlier versions transformed a
band of 48 MB and ran the products through oneDNN: the transformed tiles went to memory and back
twice, so at 128-256 channels the transforms cost as much as the products (docs/benchmarks.md).

The input staging can also apply, per channel, ``silu(x * scale + shift)`` (a GroupNorm with its
statistics, then SiLU: ``groupnorm.py``) and a nearest 2x upsampling, so the normalised or upsampled
map is never written to memory. When to use it instead of NNPACK or eager: ``fastconv.py``.
"""

from __future__ import annotations

import ctypes
import functools
from fractions import Fraction

import torch
import torch.nn as nn

from .cbuild import PRELUDE, build
from .packed_cache import PackedCache

TILE = 6  # output tile m of F(m x m, 3 x 3); 4 is also compiled (more accurate, 4x instead of 5.06x fewer multiplies)
CHANNEL_BLOCK = 16  # channels per vector (one AVX-512 register); C_in and C_out must be divisible by it
BLOCK_BYTES = 3 << 19  # V + M of one block of tiles (1.5 MiB): within a core's L2 (2 MiB here, 1 MiB on Zen 4/5) ...
MIN_BLOCK_TILES = 12  # ... but at least this many tiles, and C_in * C_out / WEIGHT_REUSE: each block streams all
WEIGHT_REUSE = 2048  # t*t*C_in*C_out transformed weights from L3 (512 channels: 64 MiB)
ROWS = 6  # tiles per micro-kernel call (register block 6 x 64 outputs: 24 accumulators)
# Interpolation points (Lavin & Gray 2016; NNPACK/wincnn use the same): 0, +-1, +-2 (, +-1/2) and infinity.
_POINTS = {4: (0, 1, -1, 2, -2), 6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))}


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


def _linear_code(mat: list[list[float]], ins: str, outs: str, rows: int) -> str:
    """C statements ``outs[i] = sum_j mat[i][j] * ins[j]`` on vectors, zero terms left out."""
    lines = []
    for i in range(rows):
        terms = [f"{float(v)!r}f * {ins}[{j}]" for j, v in enumerate(mat[i]) if v != 0]
        lines.append(f"{outs}[{i}] = {' + '.join(terms) or 'vset1(0.f)'};")
    return "\n  ".join(lines)


_MICRO_KERNEL = """
#ifndef PREFETCH
#define PREFETCH 1024
#endif
static inline void gemm6x{nw}(const float* V, long ldv, const float* U, float* M, long ldm, long K,
                               const float* P, long np) {{
  v16 c[6][{nw}];
  long per = (np / 16 + K - 1) / K;  /* lines of P to fetch into L2 per step */
  for (int r = 0; r < 6; r++) for (int j = 0; j < {nw}; j++) c[r][j] = vset1(0.f);
  for (long k = 0; k < K; k++) {{
    v16 u[{nw}];
    for (int q = 0; q < {nw}; q++) __builtin_prefetch(U + k * {w} + PREFETCH + 16 * q, 0, 3);  /* each line of the weights: they stream from L3 */
    for (long q = 0; q < per; q++) if ((k * per + q) * 16 < np) __builtin_prefetch(P + (k * per + q) * 16, 0, 2);
    for (int j = 0; j < {nw}; j++) u[j] = *(const v16*)(U + k * {w} + 16 * j);
    for (int r = 0; r < 6; r++) {{
      v16 v = vset1(V[r * ldv + k]);
      for (int j = 0; j < {nw}; j++) c[r][j] += v * u[j];
    }}
  }}
  for (int r = 0; r < 6; r++) for (int j = 0; j < {nw}; j++) *(v16*)(M + r * ldm + 16 * j) = c[r][j];
}}"""


# Moving 16 channels between NCHW rows and the kernel's (column, 16 channels) staging. In: with AVX-512, 16 columns
# at a time by 16 line loads and a 16 x 16 register transpose (unpack, unpack, two lane shuffles); the one-column
# loop handles the image edges, odd or unaligned starts and other CPUs (256-512 channels: 5-10% per conv on this Xeon; no
# gain at 128 x 512 x 512, where reading 16 channel planes at once is what costs). Out: element by element.
_STAGING = r"""
#ifdef __AVX512F__
static inline void tr16(__m512 r[16]) {  /* r[i][j] -> r[j][i] */
  __m512 t[16];
  for (int i = 0; i < 8; i++) { t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]); t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]); }
  for (int i = 0; i < 4; i++) {
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c)); r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d)); r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; i++) for (int j = 0; j < 4; j++) {
    t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
    t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
  }
  for (int j = 0; j < 8; j++) { r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88); r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd); }
}
#endif
static inline v16 pre(v16 v, const float* scale, v16 a, v16 b, int silu) {
  if (scale) v = v * a + b;
  return silu ? vsilu(v) : v;
}
/* staged columns q in [0, ncols) of one row: image column col = q0 + q (zero outside [0, W)), read from the
   row xr of 16 channels (stride HWin), at col >> 1 when up (nearest 2x), then the prologue */
static void stage_row(const float* xr, long HWin, long W, long q0, long ncols, int up, float* srow,
                      const float* scale, v16 a, v16 b, int silu) {
  for (long q = 0; q < ncols;) {
    long col = q0 + q;
#ifdef __AVX512F__
    /* a run of 16 columns starting on a cache line (one line per channel, loaded once; a run across two lines
       was slower than the loop below), else one column */
    if (!up && col >= 0 && col + 16 <= W && q + 16 <= ncols && ((uintptr_t)(xr + col) & 63) == 0) {
      __m512 r[16];
      for (int c = 0; c < 16; c++) r[c] = _mm512_loadu_ps(xr + c * HWin + col);
      tr16(r);
      for (int k = 0; k < 16; k++) *(v16*)(srow + (q + k) * 16) = pre((v16)r[k], scale, a, b, silu);
      q += 16;
      continue;
    }
    /* nearest 2x: 16 source columns from an even column on, each staged twice */
    if (up && col >= 0 && !(col & 1) && col + 32 <= W && q + 32 <= ncols && ((uintptr_t)(xr + (col >> 1)) & 63) == 0) {
      __m512 r[16];
      for (int c = 0; c < 16; c++) r[c] = _mm512_loadu_ps(xr + c * HWin + (col >> 1));
      tr16(r);
      for (int k = 0; k < 16; k++) {
        v16 v = pre((v16)r[k], scale, a, b, silu);
        *(v16*)(srow + (q + 2 * k) * 16) = v;
        *(v16*)(srow + (q + 2 * k + 1) * 16) = v;
      }
      q += 32;
      continue;
    }
#endif
    v16 v = vset1(0.f);
    if (col >= 0 && col < W) {
      const float* p = xr + (up ? col >> 1 : col);
      for (int c = 0; c < 16; c++) v[c] = p[c * HWin];
      v = pre(v, scale, a, b, silu);
    }
    *(v16*)(srow + q * 16) = v;
    q++;
  }
}
/* ncol staged outputs sr (column, 16 channels) -> 16 NCHW rows yr (stride HW); element by element: the same
   16 x 16 transposes here, storing whole lines to the 16 rows, were slower at 512 x 512 (111 vs 103 ms) */
static void write_row(const float* sr, float* yr, long HW, long ncol) {
  for (int c = 0; c < 16; c++)
    for (long j = 0; j < ncol; j++) yr[c * HW + j] = sr[j * 16 + c];
}
"""

# One conv for one image. x: (C_in, Hin, Win) with Hin = H/2 (Win = W/2) when up, else H (W); U: packed
# transformed weights (t*t, C_out/64 blocks, C_in, 64); y: (C_out, H, W). scale/shift (C_in) or NULL: input
# staging computes silu?(x * scale + shift); the zero padding stays zero (it pads the conv's input).
_CONV = """
void wino{m}_conv(const float* x, const float* U, const float* bias, float* y, const float* scale, const float* shift,
                  int silu, long H, long W, long Ci, long Co, int up, long R, long T, long P, int nt) {{
  const long m = {m}, t = {t}, tt = {t} * {t};
  long nH = (H + m - 1) / m, nW = (W + m - 1) / m, nseg = (nW + T - 1) / T, nband = (nH + R - 1) / R;
  long Tp = (R * T + 5) / 6 * 6, Hin = up ? H / 2 : H, Win = up ? W / 2 : W, SW = m * T + 2, HWin = Hin * Win, HW = H * W;
  long SR = R * m + 2, CoP = (Co / P + 63) / 64 * 64;
  /* frequency planes of V and M: padded by one cache line, so that the t*t lines of one tile do not all
     fall in the same L1 set (plane sizes are multiples of 4 KiB) */
  long fv = Tp * Ci + 16, fm = Tp * Co + 16;
  #pragma omp parallel num_threads(nt)
  {{
    /* rows of V past a block's last tile feed products that are never read: no need to clear them */
    float* V = (float*)scratch((tt * (fv + fm) + SR * SW * 16 + R * m * m * T * 16) * 4);
    float* M = V + tt * fv;
    float* st = M + tt * fm;
    float* ost = st + SR * SW * 16;
    #pragma omp for schedule(dynamic, 1)
    for (long it = 0; it < nband * nseg * P; it++) {{
      /* a block: tile rows [i0, i0 + nr), tile columns [j0, j0 + n); tile (rr, j) is row rr * n + j of V and M;
         output channels [o0, o1): small images split the channels, not the tiles, between threads */
      long blk = it / P, o0 = (it % P) * CoP, o1 = o0 + CoP < Co ? o0 + CoP : Co;
      long i0 = (blk / nseg) * R, j0 = (blk % nseg) * T;
      long nr = nH - i0 < R ? nH - i0 : R, n = nW - j0 < T ? nW - j0 : T, nt_ = nr * n;
      long r0 = i0 * m - 1, q0 = j0 * m - 1, ncols = n * m + 2, nrows = nr * m + 2;
      /* input: stage 16 channels of the block's rows as (row, col, 16), then transform each tile */
      for (long c0 = 0; c0 < Ci; c0 += 16) {{
        const float* xc = x + c0 * HWin;
        v16 a = scale ? vload(scale + c0) : vset1(1.f), b = shift ? vload(shift + c0) : vset1(0.f);
        for (long k = 0; k < nrows; k++) {{
          long r = r0 + k;
          float* srow = st + k * SW * 16;
          if (r < 0 || r >= H) {{ memset(srow, 0, ncols * 64); continue; }}
          stage_row(xc + (up ? r >> 1 : r) * Win, HWin, W, q0, ncols, up, srow, scale, a, b, silu);
        }}
        for (long jj = 0; jj < nt_; jj++) {{
          long rr = jj / n, j = jj % n;
          const float* sb = st + (rr * m * SW + j * m) * 16;
          v16 tmp[{t}][{t}];
          for (int l = 0; l < t; l++) {{
            v16 d[{t}], o[{t}];
            for (int k = 0; k < t; k++) d[k] = *(const v16*)(sb + (k * SW + l) * 16);
            bt_1d(d, o);
            for (int r = 0; r < t; r++) tmp[r][l] = o[r];
          }}
          for (int r = 0; r < t; r++) {{
            v16 o[{t}];
            bt_1d(tmp[r], o);
            for (int s = 0; s < t; s++) *(v16*)(V + (r * t + s) * fv + jj * Ci + c0) = o[s];
          }}
        }}
      }}
      /* products: M[f] (tiles, Co) = V[f] (tiles, Ci) @ U[f] (Ci, Co), 6 tiles x 64 channels per micro-kernel */
      for (int f = 0; f < tt; f++) {{
        const float* Vf = V + f * fv; const float* Uf = U + f * Ci * Co; float* Mf = M + f * fm;
        for (long n0 = o0; n0 < o1; n0 += 64) {{
          long w = Co - n0 < 64 ? Co - n0 : 64;
          const float* Ub = Uf + n0 * Ci;
          /* the next weight block (this frequency's next 64 channels, or the next frequency's first), fetched
             into L2 a slice per micro-kernel call: its first pass then does not wait on L3 */
          const float* Un = n0 + 64 < o1 ? Ub + 64 * Ci : (f + 1 < tt ? U + (f + 1) * Ci * Co + o0 * Ci : 0);
          long wn = n0 + 64 < o1 ? (o1 - n0 - 64 < 64 ? o1 - n0 - 64 : 64) : (o1 - o0 < 64 ? o1 - o0 : 64);
          long un = Un ? wn * Ci : 0, ng = (nt_ + 5) / 6, chunk = (un / ng + 15) / 16 * 16;
          for (long j = 0; j < nt_; j += 6) {{
            long g0 = j / 6 * chunk, np = un - g0 < chunk ? un - g0 : chunk;
            const float* P = Un ? Un + g0 : 0;
            if (np < 0) np = 0;
            if (w == 64) gemm6x4(Vf + j * Ci, Ci, Ub, Mf + j * Co + n0, Co, Ci, P, np);
            else if (w == 48) gemm6x3(Vf + j * Ci, Ci, Ub, Mf + j * Co + n0, Co, Ci, P, np);
            else if (w == 32) gemm6x2(Vf + j * Ci, Ci, Ub, Mf + j * Co + n0, Co, Ci, P, np);
            else gemm6x1(Vf + j * Ci, Ci, Ub, Mf + j * Co + n0, Co, Ci, P, np);
          }}
        }}
      }}
      /* output: transform 16 channels of each tile, + bias, stage as (row, col, 16), write NCHW rows */
      long ncol = W - j0 * m < n * m ? W - j0 * m : n * m;
      for (long c0 = o0; c0 < o1; c0 += 16) {{
        v16 bv = bias ? vload(bias + c0) : vset1(0.f);
        for (long jj = 0; jj < nt_; jj++) {{
          long rr = jj / n, j = jj % n;
          float* ob = ost + (rr * m * m * T + j * m) * 16;
          v16 tmp[{m}][{t}];
          for (int s = 0; s < t; s++) {{
            v16 d[{t}], o[{m}];
            for (int r = 0; r < t; r++) d[r] = *(const v16*)(M + (r * t + s) * fm + jj * Co + c0);
            at_1d(d, o);
            for (int r = 0; r < m; r++) tmp[r][s] = o[r];
          }}
          for (int r = 0; r < m; r++) {{
            v16 o[{m}];
            at_1d(tmp[r], o);
            for (int s = 0; s < m; s++) *(v16*)(ob + (r * m * T + s) * 16) = o[s] + bv;
          }}
        }}
        for (long r = 0; r < nr * m && i0 * m + r < H; r++) {{
          write_row(ost + r * m * T * 16, y + c0 * HW + (i0 * m + r) * W + j0 * m, HW, ncol);
        }}
      }}
    }}
  }}
}}"""


def _c_source() -> str:
    out = [PRELUDE, _STAGING]
    for nw in (1, 2, 3, 4):
        out.append(_MICRO_KERNEL.format(nw=nw, w=16 * nw))
    for m in (4, 6):
        at, _, bt = winograd_matrices(m)
        t = m + 2
        out.append(f"""
#define bt_1d bt{m}_1d
#define at_1d at{m}_1d
static inline void bt{m}_1d(const v16* d, v16* o) {{
  {_linear_code(bt.tolist(), "d", "o", t)}
}}
static inline void at{m}_1d(const v16* d, v16* o) {{
  {_linear_code(at.tolist(), "d", "o", m)}
}}""")
        out.append(_CONV.format(m=m, t=t))
        out.append("#undef bt_1d\n#undef at_1d")
    return "\n".join(out) + "\n"


@functools.cache  # called per conv: the source (about 18 KB, exact fractions) is generated and hashed once
def winograd_library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, ``cbuild.py``); None without gcc/OpenMP."""
    i64, ptr = ctypes.c_long, ctypes.c_void_p
    sig = (None, [ptr] * 6 + [ctypes.c_int] + [i64] * 4 + [ctypes.c_int, i64, i64, i64, ctypes.c_int])
    return build("winograd", _c_source(), {f"wino{m}_conv": sig for m in (4, 6)})


def packed_weights(conv: nn.Conv2d, m: int) -> torch.Tensor:
    """``G g G^T`` as (t*t, C_out/64 blocks of (C_in, 64)), the layout the micro-kernel streams.

    Cached on the module (not a parameter or buffer: the state dict is unchanged); rebuilt when the
    weight tensor is replaced or modified in place (its data pointer or version counter changes).
    t*t/9 = 7.1x the size of the weight (memory cost in docs/benchmarks.md).
    """
    w = conv.weight
    key = (w.data_ptr(), None if w.is_inference() else w._version, m)  # inference tensors have no version counter
    cache = conv.__dict__.get("_fastconv_cache")
    if cache and cache["key"] == key:
        return cache["u"]
    _, g, _ = winograd_matrices(m)
    co, ci = w.shape[:2]
    u = (g @ w.detach().double() @ g.T).float()  # (C_out, C_in, t, t) = G g G^T, rounded once
    u = u.permute(2, 3, 1, 0).reshape((m + 2) ** 2, ci, co)  # (t*t, C_in, C_out)
    blocks = [u[:, :, n0 : n0 + 64].reshape((m + 2) ** 2, -1) for n0 in range(0, co, 64)]  # each (t*t, C_in * w)
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
    tiles = max(MIN_BLOCK_TILES, ci * co // WEIGHT_REUSE, BLOCK_BYTES // ((m + 2) ** 2 * 4 * (ci + co)))
    cols = min(n_w, tiles)
    rows = min(n_h, max(1, tiles // cols))
    blocks = -(-n_h // rows) * -(-n_w // cols)
    parts = 1 if threads == 1 or blocks >= 2 * threads else min(-(-co // 64), -(-2 * threads // blocks))
    return rows, cols, parts


def winograd_conv2d(
    conv: nn.Conv2d,
    x: torch.Tensor,
    m: int = TILE,
    *,
    up: bool = False,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    add_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``conv(pre(x))`` for a 3x3, stride-1, padding-1 conv by Winograd F(m x m, 3 x 3); (B, C_out, H, W) NCHW.

    ``pre``: per channel ``x * scale + shift`` (``scale``/``shift`` (B, C_in) float32, or None), then
    SiLU if ``silu``, then nearest 2x upsampling if ``up``; all applied while staging the input.
    ``add_bias`` (C_out,): added to the conv's bias (a following per-channel addition, at no cost).
    NCHW in and out, like eager: the rest of the model stays in the layout it runs fastest in.
    """
    lib = winograd_library()
    b, ci, h, w = x.shape
    hh, ww = (2 * h, 2 * w) if up else (h, w)
    co = conv.out_channels
    u = packed_weights(conv, m)
    x = x.contiguous()  # (B, C_in, h, w)
    y = torch.empty(b, co, hh, ww, dtype=torch.float32)  # (B, C_out, H, W)
    bias = conv.bias.detach().contiguous() if conv.bias is not None else None
    if add_bias is not None:
        bias = (add_bias.detach().float() + (bias if bias is not None else 0)).contiguous()  # (C_out,)
    if scale is not None:
        scale, shift = scale.float().contiguous(), shift.float().contiguous()  # (B, C_in) each
    fn = getattr(lib, f"wino{m}_conv")
    nt = torch.get_num_threads()
    for k in range(b):
        fn(x[k].data_ptr(), u.data_ptr(), bias.data_ptr() if bias is not None else None, y[k].data_ptr(),
           scale[k].data_ptr() if scale is not None else None, shift[k].data_ptr() if scale is not None else None,
           int(silu), hh, ww, ci, co, int(up), *block_shape(hh, ww, ci, co, nt, m), nt)
    return y
