"""Build a C source generated at run time into a shared library, once per source and CPU, cached on disk.

Why: the fast CPU kernels (``winograd.py``, ``groupnorm.py``) are C loops generated in Python with
their constants (exact Winograd matrices) folded in. They are compiled with the system ``gcc -O3
-march=native -fopenmp`` into ``~/.cache/kl_autoencoder/`` (``$XDG_CACHE_HOME`` honoured) the first
time they are needed; the file name hashes the source, the flags and the CPU's feature flags, so a
changed kernel or another CPU builds its own copy. OpenMP loops run on torch's own libgomp thread pool
(the same runtime, checked in /proc/self/maps). Without gcc or OpenMP ``build`` returns None and the
callers fall back (NNPACK, eager).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")  # -march=native: the key includes the CPU flags

_lock = threading.Lock()
_built: dict[str, ctypes.CDLL | None] = {}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (``avx512f``, ``avx512_bf16``, ``amx_bf16``, ...); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:  # pragma: no cover - non-Linux
        line = ""
    return frozenset(line.partition(":")[2].split())


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of cpu0's largest cache (sysfs ``cache/index*/size``: L3 on x86), 0 where unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
        except OSError:  # pragma: no cover - odd sysfs
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kl_autoencoder"


def build(name: str, source: str, signatures: dict[str, tuple[object, list]]) -> ctypes.CDLL | None:
    """The library compiled from ``source`` (``name`` prefixes the cached file), with each function of
    ``signatures`` (``{fn: (restype, argtypes)}``) declared; None when it cannot be built here."""
    key = hashlib.sha256((source + " ".join(FLAGS) + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:16]
    with _lock:
        if key in _built:
            return _built[key]
        so = cache_dir() / f"{name}_{key}.so"
        lib = None
        try:
            if not so.exists():
                so.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                    (Path(tmp) / "k.c").write_text(source)
                    subprocess.run(["gcc", *FLAGS, "k.c", "-o", "k.so"], cwd=tmp, check=True, capture_output=True, timeout=300)
                    os.replace(Path(tmp) / "k.so", so)  # atomic: a parallel process sees all or nothing
            lib = ctypes.CDLL(str(so))
            for fn, (restype, argtypes) in signatures.items():
                getattr(lib, fn).restype = restype
                getattr(lib, fn).argtypes = argtypes
        except (OSError, subprocess.SubprocessError, AttributeError):
            lib = None  # no compiler / no OpenMP / a kernel this compiler rejects: callers fall back
        _built[key] = lib
        return lib


# Shared C prelude of the kernels: GCC vector types of 16 floats (one AVX-512 register; GCC splits them
# on narrower CPUs), a vectorised exp (Cody-Waite reduction + degree-6 polynomial, Cephes expf: ~1 ulp)
# and SiLU = x / (1 + exp(-x)) on them.
PRELUDE = r"""
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
typedef float v16 __attribute__((vector_size(64), aligned(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16v __attribute__((vector_size(64), aligned(64)));
#define VL 16
/* a broadcast; not (v16){} + s: without -ffast-math GCC must keep that addition (0 + -0 is +0), one more
   vector op per broadcast: 25% of the Winograd micro-kernel's throughput (docs/benchmarks.md) */
static inline v16 vset1(float s) { return (v16){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
static inline v16 vload(const float* p) { return *(const v16u*)p; }
static inline void vstore(float* p, v16 v) { *(v16u*)p = v; }
static inline v16 vsel(i16v mask, v16 a, v16 b) { return (v16)(((i16v)a & mask) | ((i16v)b & ~mask)); }
static inline v16 vexp(v16 x) {
  x = vsel(x < 88.37626f, x, vset1(88.37626f));
  x = vsel(x > -87.33654f, x, vset1(-87.33654f));
  v16 fx = x * 1.44269504088896341f + 0.5f;          /* n = floor(x log2 e + 1/2) */
  i16v n = __builtin_convertvector(fx, i16v);        /* truncates toward zero ... */
  n += __builtin_convertvector(n, v16) > fx;         /* ... so step down where that rounded up (mask is -1) */
  v16 nf = __builtin_convertvector(n, v16);
  x = x - nf * 0.693359375f + nf * 2.12194440e-4f;   /* x - n ln 2, ln 2 split in two (Cody-Waite) */
  v16 p = x * 1.9875691500E-4f + 1.3981999507E-3f;
  p = p * x + 8.3334519073E-3f; p = p * x + 4.1665795894E-2f;
  p = p * x + 1.6666665459E-1f; p = p * x + 5.0000001201E-1f;
  p = p * x * x + x + 1.0f;
  return p * (v16)((n + 127) << 23);                 /* 2^n from its float bits */
}
#ifdef __AVX512F__
#include <immintrin.h>
/* The same SiLU in fewer vector ops (measured 2.7 ulp at most over -100..100, torch's own float32 SiLU 2.2):
   n = round(x log2 e) by vrndscaleps, Cody-Waite reduction and the same polynomial, 2^n by vscalefps (no float
   bit tricks, no clamps: -x is capped at 88 so 1 + e stays finite), and x / (1 + e) as x * r with r from
   vrcp14ps (relative error < 2^-14) and one Newton step (~2^-28): a 512-bit vdivps alone costs ~16 cycles. */
static inline v16 vsilu(v16 v) {
  __m512 x = _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), (__m512)v), _mm512_set1_ps(88.0f));  /* -v */
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.9875691500E-4f), _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f)), q = _mm512_rcp14_ps(d);  /* 1 + exp(-v) */
  q = _mm512_fmadd_ps(q, _mm512_fnmadd_ps(d, q, _mm512_set1_ps(1.0f)), q);
  return (v16)_mm512_mul_ps((__m512)v, q);
}
#else
static inline v16 vsilu(v16 x) { return x / (1.0f + vexp(-x)); }
#endif
/* Chan et al.'s update: (count, mean, M2) of a channel's values so far, merged with another part's (the GroupNorm
   statistics our conv kernels compute as they write, winograd_kernels.py and amx_conv.py) */
static inline void chan_merge(double* cnt, double* mean, double* m2, double n, double mu, double q) {
  double t = *cnt + n, d = mu - *mean;
  if (t == 0) return;
  *mean += d * n / t;
  *m2 += q + d * d * *cnt * n / t;
  *cnt = t;
}
/* per-thread scratch, kept across calls and grown on demand: multi-MB buffers allocated per call would be
   page-faulted in at every call (~1.5 us per 4 KiB page on the VM measured, docs/benchmarks.md) */
static __thread char* scratch_buf;
static __thread size_t scratch_cap;
static void* scratch(size_t bytes) {
  if (bytes > scratch_cap) {
    free(scratch_buf);
    scratch_cap = (bytes + 4095) & ~(size_t)4095;
    scratch_buf = (char*)aligned_alloc(64, scratch_cap);
    memset(scratch_buf, 0, scratch_cap);
  }
  return scratch_buf;
}
"""
