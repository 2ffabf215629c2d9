"""Process-wide switches, read once from the environment at import (as timm's ``layers/config.py``).

| switch | environment variable | what it turns off |
|---|---|---|
| fast CPU convolutions | ``KL_AUTOENCODER_FASTCONV=0`` | Winograd convs of ``inference/fastconv.py`` (patched modules run eager) |
| allocator reuse | ``KL_AUTOENCODER_MALLOC=0`` | glibc malloc tuning of ``inference/malloc.py`` during CPU calls |
| (its cache) | ``KL_AUTOENCODER_MALLOC=call`` | keeping freed memory between calls: returned to the OS after each call |

Read with ``fastconv_enabled()`` / ``malloc_enabled()``; change for the whole process with
``set_fastconv(False)``, or for a block of code in this thread with ``with use_fastconv(False): ...``.
Nothing here changes process state at import.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

FASTCONV_ENV = "KL_AUTOENCODER_FASTCONV"
MALLOC_ENV = "KL_AUTOENCODER_MALLOC"
_OFF = ("0", "false", "off", "no")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in _OFF


_global = {"fastconv": _env_flag(FASTCONV_ENV), "malloc": _env_flag(MALLOC_ENV),
           "malloc_keep": os.environ.get(MALLOC_ENV, "1").strip().lower() != "call"}
_local = threading.local()  # per-thread overrides from the context managers


def _get(name: str) -> bool:
    return getattr(_local, name, _global[name])


def _set(name: str, enabled: bool) -> None:
    _global[name] = bool(enabled)


@contextlib.contextmanager
def _override(name: str, enabled: bool) -> Iterator[None]:
    missing = object()
    old = getattr(_local, name, missing)
    setattr(_local, name, bool(enabled))
    try:
        yield
    finally:
        if old is missing:
            delattr(_local, name)
        else:
            setattr(_local, name, old)


def fastconv_enabled() -> bool:
    """Whether patched convolutions take the fast CPU path (``KL_AUTOENCODER_FASTCONV``, default on)."""
    return _get("fastconv")


def set_fastconv(enabled: bool) -> None:
    """Turn the fast CPU convolutions on or off for the whole process."""
    _set("fastconv", enabled)


def use_fastconv(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Fast convolutions on/off inside the block, in this thread only."""
    return _override("fastconv", enabled)


def malloc_enabled() -> bool:
    """Whether CPU inference calls may tune glibc malloc (``KL_AUTOENCODER_MALLOC``, default on)."""
    return _get("malloc")


def set_malloc(enabled: bool) -> None:
    """Turn the allocator reuse on or off for the whole process."""
    _set("malloc", enabled)


def use_malloc(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Allocator reuse on/off inside the block, in this thread only."""
    return _override("malloc", enabled)


def malloc_keep() -> bool:
    """Whether memory freed in a CPU inference call stays cached for the next (default; ``KL_AUTOENCODER_MALLOC=call``
    returns it to the OS after each call)."""
    return _get("malloc_keep")


def set_malloc_keep(keep: bool) -> None:
    """Keep freed memory between calls (True) or return it after each call (False), for the whole process."""
    _set("malloc_keep", keep)
