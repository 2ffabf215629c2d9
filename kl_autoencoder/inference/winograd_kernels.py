"""The C source of ``winograd.py``'s fused Winograd convolution kernel (built by ``cbuild.py``).

One work item is a block of tiles: input staging (16 channels of the block's rows as (row, column, 16),
GroupNorm + SiLU applied on the way) and transform, the t*t products by a 6 x 64 register-blocked
micro-kernel, the output transform and the NCHW writes (for the sub-pixel build, each group of 16
channels' four phases into the 2x map). Why each piece is as it is: docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from .cbuild import PRELUDE


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
                               const float* P, long np, int acc) {{
  v16 c[6][{nw}];
  long per = (np / 16 + K - 1) / K;  /* lines of P to fetch into L2 per step */
  for (int r = 0; r < 6; r++) for (int j = 0; j < {nw}; j++) c[r][j] = acc ? *(const v16*)(M + r * ldm + 16 * j) : vset1(0.f);
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
# gain at 128 x 512 x 512, where reading 16 channel planes at once is what costs). Out: the same transposes.
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
   row xr of 16 channels (stride HWin), then the prologue */
static void stage_row(const float* xr, long HWin, long W, long q0, long ncols, float* srow,
                      const float* scale, v16 a, v16 b, int silu) {
  for (long q = 0; q < ncols;) {
    long col = q0 + q;
#ifdef __AVX512F__
    /* a run of 16 columns starting on a cache line (one line per channel, loaded once; a run across two lines
       was slower than the loop below), else one column */
    if (col >= 0 && col + 16 <= W && q + 16 <= ncols && ((uintptr_t)(xr + col) & 63) == 0) {
      __m512 r[16];
      for (int c = 0; c < 16; c++) r[c] = _mm512_loadu_ps(xr + c * HWin + col);
      tr16(r);
      for (int k = 0; k < 16; k++) *(v16*)(srow + (q + k) * 16) = pre((v16)r[k], scale, a, b, silu);
      q += 16;
      continue;
    }
#endif
    v16 v = vset1(0.f);
    if (col >= 0 && col < W) {
      const float* p = xr + col;
      for (int c = 0; c < 16; c++) v[c] = p[c * HWin];
      v = pre(v, scale, a, b, silu);
    }
    *(v16*)(srow + q * 16) = v;
    q++;
  }
}
/* ncol staged outputs sr (column, 16 channels) -> 16 NCHW rows yr (stride HW), plus the same rows of a
   residual rr when given (the sum an add_ pass after the conv would make, in the same order): 16 columns at a
   time by a register transpose, a 64-byte load and store per channel row (with blocks of whole tile rows 4%
   faster per conv than element by element; with the 144-column blocks before them it was slower, 111 vs 103 ms) */
static void write_row(const float* sr, float* yr, const float* rr, long HW, long ncol) {
  long j0 = 0;
#ifdef __AVX512F__
  for (; j0 + 16 <= ncol; j0 += 16) {
    __m512 r[16];
    for (int k = 0; k < 16; k++) r[k] = _mm512_loadu_ps(sr + (j0 + k) * 16);
    tr16(r);
    for (int c = 0; c < 16; c++)
      _mm512_storeu_ps(yr + c * HW + j0, rr ? _mm512_add_ps(r[c], _mm512_loadu_ps(rr + c * HW + j0)) : r[c]);
  }
#endif
  for (int c = 0; c < 16; c++)
    for (long j = j0; j < ncol; j++) {
      float v = sr[j * 16 + c];
      yr[c * HW + j] = rr ? v + rr[c * HW + j] : v;
    }
}
/* the same for two sub-pixel phases of one 2x row: staged column q is the low-resolution output column
   k = q0 + q of phase b = 0 (s0) and b = 1 (s1), written to columns 2k and 2k - 1 of the 2x rows yr (of w
   low-resolution columns): each 2x row is written once, in order */
static void write_row_pair(const float* s0, const float* s1, float* yr, long HW, long ncol, long q0, long w) {
  for (int c = 0; c < 16; c++) {
    float* yc = yr + c * HW;
    for (long q = 0; q < ncol; q++) {
      long k = q0 + q;
      if (k >= 1 && k <= w) yc[2 * k - 1] = s1[q * 16 + c];
      if (k < w) yc[2 * k] = s0[q * 16 + c];
    }
  }
}
/* GroupNorm statistics of 16 channels' rows just written (still in L2): per channel, the block's rows
   y[c HW + r W + j], r < nrows, j < ncol, summed in float as deviations from the block's first value, then
   merged in double into (cnt, mean, m2)[c] */
static void block_stats(const float* y, long HW, long W, long nrows, long ncol, double* cnt, double* mean, double* m2) {
  for (int c = 0; c < 16; c++) {
    const float* yc = y + c * HW;
    float k = yc[0];
    v16 a1 = vset1(0.f), a2 = vset1(0.f);
    float r1 = 0.f, r2 = 0.f;
    for (long r = 0; r < nrows; r++) {
      const float* row = yc + r * W;
      long j = 0;
      for (; j + 16 <= ncol; j += 16) { v16 d = vload(row + j) - k; a1 += d; a2 += d * d; }
      for (; j < ncol; j++) { float d = row[j] - k; r1 += d; r2 += d * d; }
    }
    for (int l = 0; l < 16; l++) { r1 += a1[l]; r2 += a2[l]; }
    double n = (double)nrows * ncol, s1 = r1, s2 = r2;
    chan_merge(cnt + c, mean + c, m2 + c, n, k + s1 / n, s2 - s1 * s1 / n);
  }
}
"""

# One conv for one image. x: (C_in, H, W); U: packed
# transformed weights (t*t, C_out/64 blocks, C_in, 64); y: (C_out, H, W); res (C_out, H, W) or NULL: added to y;
# stats (3, C_out) zeroed or NULL: each channel's (count, mean, M2) of y accumulated. scale/shift (C_in) or NULL: input
# staging computes silu?(x * scale + shift); the zero padding stays zero (it pads the conv's input).
# sub (F(7,2) build): the 2x2 sub-pixel conv of an upsampler, padding 1: x (C_in, H - 1, W - 1), outputs (H, W)
# of C_out = 4 C channels in groups of 64: 16 channels x 4 phases (16 g + c, phase 2a + b at 64 g + 16 (2a + b) + c);
# output row i, column j of phase (a, b) is written to y (C, 2 (H - 1), 2 (W - 1)) at (2 i - a, 2 j - b)
# (subpixel.py), once a group's four phases are staged.
_CONV = """
void wino{m}_conv(const float* x, const float* U, const float* bias, float* y, const float* res, double* stats, const float* scale, const float* shift,
                  int silu, long H, long W, long Ci, long Co, long R, long T, long P, int nt) {{
  const long m = {m}, t = {t}, tt = {t} * {t}, sub = {sub};
  long nH = (H + m - 1) / m, nW = (W + m - 1) / m, nseg = (nW + T - 1) / T, nband = (nH + R - 1) / R;
  long Tp = (R * T + 5) / 6 * 6, Hin = H - sub, Win = W - sub, SW = m * T + 2, HWin = Hin * Win, HW = H * W;
  long SR = R * m + 2, CoP = (Co / P + 63) / 64 * 64, OS = R * m * m * T * 16;  /* OS: output staging per 16 channels */
  /* frequency planes of V and M: padded by one cache line, so that the t*t lines of one tile do not all
     fall in the same L1 set (plane sizes are multiples of 4 KiB) */
  long fv = Tp * Ci + 16, fm = Tp * Co + 16;
  #pragma omp parallel num_threads(nt)
  {{
    /* rows of V past a block's last tile feed products that are never read: no need to clear them */
    float* V = (float*)scratch((tt * (fv + fm) + SR * SW * 16 + (sub ? 4 : 1) * OS) * 4);
    double* ts = stats ? (double*)calloc(3 * Co, sizeof(double)) : 0;  /* this thread's (count, mean, M2) per channel */
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
          if (r < 0 || r >= Hin) {{ memset(srow, 0, ncols * 64); continue; }}
          stage_row(xc + r * Win, HWin, Win, q0, ncols, srow, scale, a, b, silu);
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
      /* products: M[f] (tiles, Co) = V[f] (tiles, Ci) @ U[f] (Ci, Co), 6 tiles x 64 channels per micro-kernel,
         summed over input-channel chunks of {kchunk} (0: all at once) */
      for (int f = 0; f < tt; f++) {{
        const float* Vf = V + f * fv; const float* Uf = U + f * Ci * Co; float* Mf = M + f * fm;
        for (long n0 = o0; n0 < o1; n0 += 64) {{
          long w = Co - n0 < 64 ? Co - n0 : 64;
          const float* Ub = Uf + n0 * Ci;
          /* the next weight block (this frequency's next 64 channels, or the next frequency's first), fetched
             into L2 a slice per micro-kernel call: its first pass then does not wait on L3 */
          const float* Un = n0 + 64 < o1 ? Ub + 64 * Ci : (f + 1 < tt ? U + (f + 1) * Ci * Co + o0 * Ci : 0);
          long wn = n0 + 64 < o1 ? (o1 - n0 - 64 < 64 ? o1 - n0 - 64 : 64) : (o1 - o0 < 64 ? o1 - o0 : 64);
          long KC = {kchunk} ? {kchunk} : Ci, nk = (Ci + KC - 1) / KC, calls = nk * ((nt_ + 5) / 6);
          long un = Un ? wn * Ci : 0, chunk = (un / calls + 15) / 16 * 16;
          for (long k0 = 0, g = 0; k0 < Ci; k0 += KC) {{
            long kc = Ci - k0 < KC ? Ci - k0 : KC;
            const float* Uc = Ub + k0 * w;  /* rows k0 .. k0 + kc of the (C_in, w) block */
            for (long j = 0; j < nt_; j += 6, g++) {{
              long g0 = g * chunk, np = un - g0 < chunk ? un - g0 : chunk;
              const float* P = Un ? Un + g0 : 0;
              const float* Vj = Vf + j * Ci + k0; float* Mj = Mf + j * Co + n0;
              if (np < 0) np = 0;
              if (w == 64) gemm6x4(Vj, Ci, Uc, Mj, Co, kc, P, np, k0 > 0);
              else if (w == 48) gemm6x3(Vj, Ci, Uc, Mj, Co, kc, P, np, k0 > 0);
              else if (w == 32) gemm6x2(Vj, Ci, Uc, Mj, Co, kc, P, np, k0 > 0);
              else gemm6x1(Vj, Ci, Uc, Mj, Co, kc, P, np, k0 > 0);
            }}
          }}
        }}
      }}
      /* output: transform 16 channels of each tile, + bias, stage as (row, col, 16), write NCHW rows */
      long ncol = W - j0 * m < n * m ? W - j0 * m : n * m;
      for (long c0 = o0; c0 < o1; c0 += 16) {{
        v16 bv = bias ? vload(bias + c0) : vset1(0.f);
        for (long jj = 0; jj < nt_; jj++) {{
          long rr = jj / n, j = jj % n;
          float* ob = ost + (sub ? (c0 >> 4 & 3) * OS : 0) + (rr * m * m * T + j * m) * 16;
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
        if (sub) {{
          if ((c0 >> 4 & 3) == 3)  /* the group's four phases are staged: 2x rows 2i (a = 0) and 2i - 1 (a = 1) */
            for (long r = 0; r < nr * m; r++)
              for (long a = 0, i = i0 * m + r; a < 2; a++)
                if (i >= a && i < Hin + a)
                  write_row_pair(ost + 2 * a * OS + r * m * T * 16, ost + (2 * a + 1) * OS + r * m * T * 16,
                                 y + (c0 >> 6) * 16 * 4 * HWin + (2 * i - a) * 2 * Win, 4 * HWin, ncol, j0 * m, Win);
        }} else
          for (long r = 0; r < nr * m && i0 * m + r < H; r++)
            write_row(ost + r * m * T * 16, y + c0 * HW + (i0 * m + r) * W + j0 * m,
                      res ? res + c0 * HW + (i0 * m + r) * W + j0 * m : 0, HW, ncol);
        if (ts && !sub) {{
          long rows = H - i0 * m < nr * m ? H - i0 * m : nr * m;
          block_stats(y + c0 * HW + i0 * m * W + j0 * m, HW, W, rows, ncol, ts + c0, ts + Co + c0, ts + 2 * Co + c0);
        }}
      }}
    }}
    if (ts) {{
      #pragma omp critical
      for (long c = 0; c < Co; c++) chan_merge(stats + c, stats + Co + c, stats + 2 * Co + c, ts[c], ts[Co + c], ts[2 * Co + c]);
      free(ts);
    }}
  }}
}}"""


def c_source(specs: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> str:
    """The kernels' C source: one ``wino{m}_conv`` per (m, r, A^T (m, t), B^T (t, t)) of ``specs``, F(m, r)
    (r = 2: the sub-pixel build), with the transforms' constants folded into straight-line code."""
    out = [PRELUDE, _STAGING]
    for nw in (1, 2, 3, 4):
        out.append(_MICRO_KERNEL.format(nw=nw, w=16 * nw))
    for m, r, at, bt in specs:
        t = m + r - 1
        out.append(f"""
#define bt_1d bt{m}_1d
#define at_1d at{m}_1d
static inline void bt{m}_1d(const v16* d, v16* o) {{
  {_linear_code(bt.tolist(), "d", "o", t)}
}}
static inline void at{m}_1d(const v16* d, v16* o) {{
  {_linear_code(at.tolist(), "d", "o", m)}
}}""")
        # the sub-pixel build's 4 C_out outputs re-read each V row 4x as often: C_in in chunks of 128 (the chunk's
        # weights stay in L1 across the block's tiles) was 4-8% faster there, 0-6% slower for F(6,3)
        out.append(_CONV.format(m=m, t=t, sub=int(r == 2), kchunk=128 if r == 2 else 0))
        out.append("#undef bt_1d\n#undef at_1d")
    return "\n".join(out) + "\n"
