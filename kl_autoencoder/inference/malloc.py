"""Reuse freed memory instead of handing it back to the OS (glibc malloc) during CPU inference calls.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it again on ``free``. A VAE's full-resolution activations are far larger (128 channels x 512 x 512
float32 = 128 MiB), so every one of them is page-faulted in, 4 KiB at a time, and zeroed by the kernel
on each call. Measured on the 2-core VM this project is developed on (docs/benchmarks.md): a plain
diffusers SD encode at 512 px takes 1.4 M page faults and 2.2 of its 3.9 s are system time; the decode
2.9 M faults, 4.8 of 8.1 s.

Inside ``reuse_freed_memory()``: ``M_MMAP_MAX = 0`` makes malloc serve large blocks from its heap, and a
high ``M_TRIM_THRESHOLD`` keeps freed heap memory for the next allocation, so a block is faulted in once
and then reused. This is what PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``) gets
by preloading jemalloc/tcmalloc, without a preload.

Between calls (issue 20): on leaving the outermost block ``M_MMAP_MAX`` is back at its default, but the
freed heap stays with the process, as a cache for the next call, like torch's CUDA caching allocator and
the arenas of OpenVINO and ONNX Runtime: without it the next call faults its activations in again (SD at
512 px: encode 0.27 M faults and 2.63 s, decode 0.24 M and 5.47 s; kept: 0 faults, 2.43 s and 4.79 s).
``release()`` (``kl_autoencoder.empty_cache()``) hands it back (``malloc_trim``) and restores glibc's trim
threshold; ``KL_AUTOENCODER_MALLOC=call`` does that after every call.

Where: ``inference.codec.encode_moments`` / ``decode``, one block per call, for models on CPU running untiled
when memory is plentiful (the reuse raises the peak: see ``memory_plan.REUSE_MEMORY_FACTOR``). Off with
``KL_AUTOENCODER_MALLOC=0`` (read once at import, ``settings.py``) or ``settings.use_malloc(False)``.
Elsewhere than glibc (macOS, Windows, musl) it does nothing.

Side effects, process-wide because malloc's settings are: while any thread is inside a block, every
thread's allocations are served this way; glibc's dynamic mmap threshold stays at its value of the
moment of the first block (any ``mallopt`` call freezes it); and the heap keeps the address range the
block grew (its pages are returned by ``malloc_trim``), which later allocations outside a block reuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from typing import Iterator

from .. import settings

# glibc malloc.h parameter numbers and their documented defaults (man 3 mallopt)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # int max: never trim inside the block

_lock = threading.Lock()
_depth = 0  # process-wide nesting depth: mallopt settings are process-wide too
_kept = False  # freed memory of an earlier block kept (the trim threshold still high) until release()


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # pragma: no cover - exotic systems
        return None


def supported() -> bool:
    """True on Linux with glibc (the only allocator this module tunes)."""
    return _libc() is not None


def active() -> bool:
    """True while some thread of this process is inside ``reuse_freed_memory()`` with the tuning applied."""
    return _depth > 0


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Keep freed large blocks in malloc's heap for reuse inside the block (nestable, thread-safe).

    A no-op when ``enabled`` is False, the environment switch is off or the C library is not glibc.
    """
    global _depth, _kept
    libc = _libc() if enabled and settings.malloc_enabled() else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                _kept = settings.malloc_keep()
                if not _kept:
                    _trim(libc)


def _trim(libc: ctypes.CDLL) -> None:
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)


def kept() -> bool:
    """True while memory freed by an earlier call is kept for the next one (until ``release()``)."""
    return _kept


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33 malloc.h struct mallinfo2, all size_t
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                 "uordblks", "fordblks", "keepcost")]


def kept_bytes() -> int:
    """Bytes of freed memory malloc keeps mapped for the next call (``mallinfo2().fordblks``; 0 when nothing is
    kept). The memory planner counts them as available: the host's free RAM no longer does."""
    libc = _libc()
    if libc is None or not _kept or not hasattr(libc, "mallinfo2"):
        return 0
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)


def release() -> None:
    """Return the memory kept between calls to the OS and restore glibc's trim threshold (no-op while a
    call is running, or when nothing is kept). Public as ``kl_autoencoder.empty_cache()``."""
    global _kept
    libc = _libc()
    with _lock:
        if libc is None or _depth > 0 or not _kept:
            return
        _trim(libc)
        _kept = False
