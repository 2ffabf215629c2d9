"""bf16 convolutions by AMX tile instructions: the 3x3 convs of a ResnetBlock2D and Downsample2D, and
Upsample2D's sub-pixel convs, with the next GroupNorm's statistics from the same pass.

Why: in the bf16 SD encoder at 512 px the convolutions were ~75% of the time and oneDNN's AMX kernels ran
the ResnetBlock2D convs at 2.4 (128 channels at 512 px) to 3.3 TF/s in the network; each of their outputs
was then read once more for GroupNorm statistics (a 64 MB map at ~13 GB/s: ~5 ms). Here a conv is an
implicit GEMM on AMX (``TDPBF16PS``: 16 x 32 bf16 times 32 x 16 bf16 into 16 x 16 float per instruction):
for each output row, 32 pixels x 32 output channels accumulate in four 16 x 16 tiles over the taps x C_in / 32
steps; the input tiles are read straight from the map (16 pixels, a 64-byte channel slice each, row stride
s x C_in), which is why the input carries its zero padding (no edge cases: the GroupNorm + SiLU pass that
precedes a ResnetBlock2D conv writes into a zero-bordered map, Downsample2D pads anyway, the upsampler copies
its small input into one). The weights, packed once per layer in the VNNI pairs AMX reads, are streamed
(``TILELOADDT1``) so the input rows stay in L1, and split into chunks of output channels that fit in L2 with the
rows they meet. Each output is bias (+ residual) added to the float sum and rounded once to bf16 (oneDNN's
post-ops do the same), written while the next block's products run; the kernel also sums the rounded values
per channel (per output row from its first value, merged across rows and threads in float64 by Chan's
update): the statistics of the GroupNorm that follows (``groupnorm.attach_channel_moments``).

Upsample2D (nearest 2x, then a 3x3 conv) runs as four 2x2 sub-pixel convs on the low-resolution map
(``subpixel.py``), each phase's outputs written in place in the 2x map (2.25x fewer products, no 2x input).

Measured (docs/benchmarks.md, 2 threads, one conv alone, input out of cache): 128 ch at 512 px 3.8-3.9 TF/s
(oneDNN 2.7), 256 at 256 4.0 (3.3), 512 at 128 4.0-4.2 (3.6). Applies where the CPU has AMX (``amx_bf16``,
Intel Xeon since Sapphire Rapids), channels are multiples of 32 and the output width (low-resolution width for
the upsampler) a multiple of 32; the rest stays on oneDNN (``bf16.py``).
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
CHUNK_BYTES = 640 << 10  # packed weights per output-channel chunk: 128x128 and 512x64 (x 9 taps) fit with the rows

_SOURCE = PRELUDE + r"""
#include <immintrin.h>
#include <unistd.h>
#include <sys/syscall.h>

/* Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA,
   Documentation/arch/x86/xstate.rst); process-wide, so asking again is harmless (oneDNN asks too). */
int amx_request(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

struct tilecfg { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed));

static void tiles_on(void) {  /* 8 tiles of 16 rows x 64 bytes: A0 A1 (inputs), B0 B1 (weights), C00 C01 C10 C11 */
  struct tilecfg c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; i++) { c.colsb[i] = 64; c.rows[i] = 16; }
  _tile_loadconfig(&c);
}

static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* One output pixel of a block: two 16-channel halves from the float tiles in buf, + bias (+ residual), rounded
   to bf16 (round to nearest even), packed into 64 bytes; u0, u1: the rounded values widened back. */
static inline __m512i out_px(const float* buf, int i, const float* bias, const uint16_t* res, __m512* u0, __m512* u1) {
  int m = i >> 4;
  __m512 v0 = _mm512_add_ps(_mm512_load_ps(buf + (2 * m) * 256 + (i & 15) * 16), _mm512_loadu_ps(bias));
  __m512 v1 = _mm512_add_ps(_mm512_load_ps(buf + (2 * m + 1) * 256 + (i & 15) * 16), _mm512_loadu_ps(bias + 16));
  if (res) {
    v0 = _mm512_add_ps(v0, widen(_mm256_loadu_si256((const __m256i*)res)));
    v1 = _mm512_add_ps(v1, widen(_mm256_loadu_si256((const __m256i*)(res + 16))));
  }
  __m256i h0 = (__m256i)_mm512_cvtneps_pbh(v0), h1 = (__m256i)_mm512_cvtneps_pbh(v1);
  *u0 = widen(h0); *u1 = widen(h1);
  return _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
}

/* A block of 32 pixels x 32 channels (c0..) waiting to be written: pixel i at yo + i * ystep, its residual (or NULL) at
   rr + i * Co; first: the block that starts its output row (the row's statistics are shifted by its first values). */
struct block { uint16_t* yo; const uint16_t* rr; long ystep, c0; int first; };

/* Pixels i0..i1-1 of a block from its float tiles in buf; K, s1, s2 (or NULL): the output row's per-channel shift and
   shifted sums. */
static void emit(const float* buf, int i0, int i1, const struct block* bk, const float* bias, long Co, int stream,
                 float* K, float* s1, float* s2) {
  __m512 u0, u1, z = _mm512_setzero_ps(), a0 = z, a1 = z, b0 = z, b1 = z;
  long c0 = bk->c0;
  if (K && bk->first && i0 == 0) {
    out_px(buf, 0, bias + c0, bk->rr, &u0, &u1);
    _mm512_storeu_ps(K + c0, u0); _mm512_storeu_ps(K + c0 + 16, u1);
    _mm512_storeu_ps(s1 + c0, z); _mm512_storeu_ps(s1 + c0 + 16, z); _mm512_storeu_ps(s2 + c0, z); _mm512_storeu_ps(s2 + c0 + 16, z);
  }
  __m512 k0 = K ? _mm512_loadu_ps(K + c0) : z, k1 = K ? _mm512_loadu_ps(K + c0 + 16) : z;
  for (int i = i0; i < i1; i++) {
    __m512i o = out_px(buf, i, bias + c0, bk->rr ? bk->rr + i * Co : NULL, &u0, &u1);
    uint16_t* yo = bk->yo + i * bk->ystep;
    if (stream) _mm512_stream_si512((__m512i*)yo, o); else _mm512_storeu_si512(yo, o);
    u0 = _mm512_sub_ps(u0, k0); u1 = _mm512_sub_ps(u1, k1);
    a0 = _mm512_add_ps(a0, u0); a1 = _mm512_add_ps(a1, u1); b0 = _mm512_fmadd_ps(u0, u0, b0); b1 = _mm512_fmadd_ps(u1, u1, b1);
  }
  if (K) {
    _mm512_storeu_ps(s1 + c0, _mm512_add_ps(_mm512_loadu_ps(s1 + c0), a0));
    _mm512_storeu_ps(s1 + c0 + 16, _mm512_add_ps(_mm512_loadu_ps(s1 + c0 + 16), a1));
    _mm512_storeu_ps(s2 + c0, _mm512_add_ps(_mm512_loadu_ps(s2 + c0), b0));
    _mm512_storeu_ps(s2 + c0 + 16, _mm512_add_ps(_mm512_loadu_ps(s2 + c0 + 16), b1));
  }
}

/* One image through a conv on a padded input xp (rows xrs elements apart; no padding left to do), output rows ys apart:
   - ph == 1: a 3x3 conv of stride s: output (r, c) from xp rows s r .. s r + 2, columns s c .. s c + 2; (H, W) output;
   - ph == 2: nearest 2x upsampling then a 3x3 conv with padding 1 (diffusers Upsample2D) as four 2x2 sub-pixel convs
     on the low-resolution map (subpixel.py): output (2 r + a, 2 c + b) from xp rows r + a .. r + a + 1, columns
     c + b .. c + b + 1 (xp with a zero border of 1), phase 2 a + b's weights; (H, W): the low-resolution size.
   wp: packed [phase][Co/16][tap][Ci/32] tiles of 16 (pairs of input channels) x 16 (outputs) x 2; bias float32;
   res (ph == 1 only): (H, W, Co) or NULL; mom: (3, Co) float64 (n, mean, M2) merged into, or NULL.
   Ci, Co, occ multiples of 32, occ divides Co, W a multiple of 32; stream: y 64-byte aligned, streaming stores.
   Each block's output is written while the next block's products run (a part of it after each tap): the vector unit
   and the tile unit work side by side (alone, the output pass cost 27% at 128 channels). */
void conv_bf16(const uint16_t* xp, long xrs, long s, int ph, const uint16_t* wp, const float* bias, const uint16_t* res,
               uint16_t* y, long ys, double* mom, long H, long W, long Ci, long Co, long occ, int stream, int nt) {
  static const int dy3[9] = {0, 0, 0, 1, 1, 1, 2, 2, 2}, dx3[9] = {0, 1, 2, 0, 1, 2, 0, 1, 2}, d2[4] = {0, 0, 1, 1}, e2[4] = {0, 1, 0, 1};
  int ntap = ph == 1 ? 9 : 4;
  const int *dy = ph == 1 ? dy3 : d2, *dx = ph == 1 ? dx3 : e2;
  long nkb = Ci / 32, nch = Co / occ, wob = ntap * nkb * 512, wph = Co / 16 * wob;  /* 16 outputs' weights, a phase's */
  #pragma omp parallel num_threads(nt)
  {
    tiles_on();
    float* buf = (float*)aligned_alloc(64, (2048 + 3 * Co) * sizeof(float));  /* two blocks' tiles, then K s1 s2 */
    float *K = mom ? buf + 2048 : NULL, *s1 = buf + 2048 + Co, *s2 = s1 + Co;
    double* acc = mom ? (double*)calloc(3 * Co, sizeof(double)) : NULL;
    #pragma omp for schedule(static) collapse(2)
    for (long ch = 0; ch < nch; ch++)  /* a chunk of output channels whose weights stay in L2 */
      for (long r = 0; r < H; r++)
        for (int a = 0; a < ph; a++) {  /* output row ph r + a */
          long orow = ph * r + a;
          int cur = 0, have = 0;
          struct block pend;  /* the block waiting to be written: in buf + 1024 * (cur ^ 1) */
          for (long x0 = 0; x0 < W; x0 += 32)
            for (int b = 0; b < ph; b++)
              for (long ob = ch * occ / 16; ob < (ch + 1) * occ / 16; ob += 2) {
                const uint16_t* w0 = wp + (a * ph + b) * wph + ob * wob;
                _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
                for (int t = 0; t < ntap; t++) {
                  const uint16_t* ap = xp + (s * r + a + dy[t]) * xrs + (s * x0 + b + dx[t]) * Ci;  /* 16 pixels s apart */
                  const uint16_t* bp = w0 + t * nkb * 512;
                  for (long kb = 0; kb < nkb; kb++) {
                    _tile_loadd(0, ap + kb * 32, s * Ci * 2);
                    _tile_loadd(1, ap + 16 * s * Ci + kb * 32, s * Ci * 2);
                    _tile_stream_loadd(2, bp + kb * 512, 64);  /* read once per block: kept out of L1 */
                    _tile_stream_loadd(3, bp + wob + kb * 512, 64);
                    _tile_dpbf16ps(4, 0, 2); _tile_dpbf16ps(5, 0, 3); _tile_dpbf16ps(6, 1, 2); _tile_dpbf16ps(7, 1, 3);
                  }
                  if (have) emit(buf + 1024 * (cur ^ 1), t * 32 / ntap, (t + 1) * 32 / ntap, &pend, bias, Co, stream, K, s1, s2);
                }
                float* c = buf + 1024 * cur;
                _tile_stored(4, c, 64); _tile_stored(5, c + 256, 64); _tile_stored(6, c + 512, 64); _tile_stored(7, c + 768, 64);
                pend.yo = y + orow * ys + (ph * x0 + b) * Co + ob * 16;
                pend.rr = res ? res + (orow * W + x0) * Co + ob * 16 : NULL;
                pend.ystep = ph * Co; pend.c0 = ob * 16; pend.first = x0 == 0 && b == 0;
                have = 1; cur ^= 1;
              }
          emit(buf + 1024 * (cur ^ 1), 0, 32, &pend, bias, Co, stream, K, s1, s2);  /* the row's last */
          if (acc)  /* the row's ph W values per channel: mean K + s1 / n, M2 s2 - s1^2 / n, merged in float64 */
            for (long c = ch * occ, n = ph * W; c < (ch + 1) * occ; c++)
              chan_merge(acc + c, acc + Co + c, acc + 2 * Co + c, (double)n, K[c] + (double)s1[c] / n,
                         (double)s2[c] - (double)s1[c] * s1[c] / n);
        }
    if (acc) {
      #pragma omp critical
      for (long c = 0; c < Co; c++)
        chan_merge(mom + c, mom + Co + c, mom + 2 * Co + c, acc[c], acc[Co + c], acc[2 * Co + c]);
      free(acc);
    }
    free(buf);
    _tile_release();
  }
  if (stream) _mm_sfence();
}
"""


@functools.cache
def library() -> ctypes.CDLL | None:
    if "amx_bf16" not in cpu_flags():
        return None
    i64, ptr, i32 = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    lib = build("amx_conv", _SOURCE, {"amx_request": (i32, []),
                                      "conv_bf16": (None, [ptr, i64, i64, i32, ptr, ptr, ptr, ptr, i64, ptr, *[i64] * 5, i32, i32])})
    # without the permission the first tile instruction kills the process (SIGILL): no library then
    return lib if lib is not None and lib.amx_request() else None


def supported() -> bool:
    """True where this CPU has AMX bf16, the kernel builds and Linux grants this process the tile state."""
    return library() is not None


def _conv_ok(conv: nn.Module, x: torch.Tensor) -> bool:
    w = getattr(conv, "weight", None)
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros" and w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16
        and x.device.type == "cpu" and x.dim() == 4 and conv.in_channels % 32 == 0 and conv.out_channels % 32 == 0
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


def applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` can run here: a bf16 3x3 conv, stride 1, zero padding 1, channels and width
    multiples of 32, no autograd recording (``x``: the conv's input, without its border)."""
    return _conv_ok(conv, x) and conv.stride == (1, 1) and conv.padding == (1, 1) and x.shape[3] % 32 == 0


def applies_strided(conv: nn.Module, x: torch.Tensor) -> bool:
    """The same for diffusers' Downsample2D conv: 3x3, stride 2, no padding, on ``x`` already padded on the right
    and bottom; the output width (W - 3) // 2 + 1 a multiple of 32."""
    return (_conv_ok(conv, x) and conv.stride == (2, 2) and conv.padding == (0, 0) and x.shape[2] >= 3
            and x.shape[3] >= 3 and ((x.shape[3] - 3) // 2 + 1) % 32 == 0)


def packed_weight(conv: nn.Conv2d, kind: str = "conv") -> torch.Tensor:
    """The weights in AMX's order for ``kind`` "conv" (the 3x3 taps) or "subpixel" (Upsample2D's four 2x2 phases,
    ``subpixel.py``), cached on the module (``weight_key``: a replaced or modified weight is repacked); not a
    buffer, the state dict is unchanged."""
    w = conv.weight
    key = weight_key(w)
    cache = conv.__dict__.setdefault("_amx_cache", PackedCache())
    if cache.get(kind, (None,))[0] != key:
        co, ci = conv.out_channels, conv.in_channels
        if kind == "conv":
            taps = w.detach().reshape(1, co // 16, 16, ci // 32, 16, 2, 9)  # (phase, ob, n, kb, pair, 2, tap)
        else:  # (4 C_out, C_in, 2, 2), phase 2a + b in rows [(2a + b) C_out, ...): summed in float32, rounded once
            taps = subpixel_weights(w.detach()).to(torch.bfloat16).reshape(4, co // 16, 16, ci // 32, 16, 2, 4)
        # -> [phase][C_out/16 blocks][taps][C_in/32 steps][16 input pairs][16 outputs][2]: a B tile is 16 rows of
        # 16 (outputs) x 2 (consecutive input channels), AMX's VNNI order for bf16
        cache[kind] = (key, taps.permute(0, 1, 6, 3, 4, 2, 5).contiguous())
    return cache[kind][1]


def padded_empty(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """(B, C, H + 2, W + 2) bf16 channels_last with a zero border (only the border is written here)."""
    p = torch.empty(b, c, h + 2, w + 2, dtype=torch.bfloat16, memory_format=CL)
    p[:, :, 0].zero_()
    p[:, :, h + 1].zero_()
    p[:, :, 1 : h + 1, 0].zero_()
    p[:, :, 1 : h + 1, w + 1].zero_()
    return p


def interior(p: torch.Tensor) -> torch.Tensor:
    """The (B, C, H, W) map inside ``padded_empty``'s border (a view)."""
    return p[:, :, 1:-1, 1:-1]


def _chunk(ci: int, co: int) -> int:
    """Output channels per chunk: halved from C_out while the chunk's packed weights exceed ``CHUNK_BYTES``."""
    occ = co
    while occ > 32 and occ * ci * 18 > CHUNK_BYTES and (occ // 2) % 32 == 0:
        occ //= 2
    return occ


def _run(conv: nn.Conv2d, kind: str, xp: torch.Tensor, y: torch.Tensor, h: int, w: int, residual: torch.Tensor | None,
         stats: bool) -> torch.Tensor:
    """The kernel over each image: ``h`` x ``w`` output rows / columns (sub-pixel: low-resolution ones)."""
    b, ci = xp.shape[:2]
    co = conv.out_channels
    assert xp.is_contiguous(memory_format=CL) and ci == conv.in_channels
    assert y.stride(1) == 1 and y.stride(3) == co
    if residual is not None:
        residual = residual.contiguous(memory_format=CL)  # (B, C_out, H, W)
    wt = packed_weight(conv, kind)
    bias = conv.bias.detach().float().contiguous() if conv.bias is not None else torch.zeros(co)  # (C_out,), per call:
    # C_out floats, and a bias changed in place is never stale
    mom = torch.zeros(b, 3, co, dtype=torch.float64) if stats else None  # (B, [n, mean, M2], C_out)
    stream = all(y[k].data_ptr() % 64 == 0 for k in range(b)) and (y.stride(2) * 2) % 64 == 0
    for k in range(b):
        library().conv_bf16(xp[k].data_ptr(), xp.stride(2), conv.stride[0], 1 if kind == "conv" else 2, wt.data_ptr(),
                            bias.data_ptr(), residual[k].data_ptr() if residual is not None else None, y[k].data_ptr(),
                            y.stride(2), mom[k].data_ptr() if mom is not None else None, h, w, ci, co,
                            _chunk(ci, co), int(stream), torch.get_num_threads())
    if mom is not None:
        groupnorm.attach_channel_moments(y, mom[:, 1], mom[:, 2])
    return y


def conv3x3(conv: nn.Conv2d, xp: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
            stats: bool = False) -> torch.Tensor:
    """``conv(x) (+ residual)`` for x = ``interior(xp)`` (``applies(conv, x)``), or ``conv(xp)`` for a stride-2
    conv (``applies_strided(conv, xp)``): (B, C_out, H, W) bf16, channels_last, written into ``out`` if given
    (e.g. another padded map's interior). ``stats``: the output's per-channel mean and M2 attached for the next
    GroupNorm (``groupnorm.attach_channel_moments``)."""
    b, _, hp, wp_ = xp.shape
    s, co = conv.stride[0], conv.out_channels
    h, w = (hp - 3) // s + 1, (wp_ - 3) // s + 1  # xp holds the padding: a padding-0 conv of stride s
    y = torch.empty(b, co, h, w, dtype=torch.bfloat16, memory_format=CL) if out is None else out
    assert y.shape == (b, co, h, w)
    return _run(conv, "conv", xp, y, h, w, residual, stats)


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor, stats: bool = True) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` (diffusers Upsample2D; ``applies(conv, x)``) as four
    2x2 sub-pixel convs on the low-resolution map, each output phase written in place in the 2x map: (B, C_out, 2H,
    2W) bf16 channels_last, with the next GroupNorm's statistics attached if ``stats``."""
    b, c, h, w = x.shape
    xp = padded_empty(b, c, h, w)  # (B, C, H + 2, W + 2)
    interior(xp).copy_(x)
    y = torch.empty(b, conv.out_channels, 2 * h, 2 * w, dtype=torch.bfloat16, memory_format=CL)
    return _run(conv, "subpixel", xp, y, h, w, None, stats)
