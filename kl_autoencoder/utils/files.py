"""Writing files so that a crash or a kill never leaves a half-written one under the final name.

Every output of the package goes through ``atomic_path`` (one file) or ``staging_dir`` (a folder of
files): the bytes go to a temporary name beside the target, are flushed to disk, get the permissions
a plain ``open()`` would give (0666 minus the umask: safetensors and ``tempfile`` create 0600 files)
and are then renamed over the target, which POSIX makes atomic.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:  # os.umask has no getter: set and restore at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def disk_full_says(path: str | Path, need: int, what: str) -> Iterator[None]:
    """Turn ENOSPC inside the block into a DiskFullError naming ``path``, the space ``what`` needs (``need``
    bytes, an estimate) and the free space, and saying the job resumes when run again."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        from ..errors import DiskFullError

        free = shutil.disk_usage(Path(path).parent).free
        raise DiskFullError(errno.ENOSPC, f"{path}: disk full while writing {what}: it needs about {human_bytes(need)}, "
                            f"{human_bytes(free)} is free; free some space and run the same command again to resume") from None


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path``.

    On leaving the block normally the file is fsynced (``fsync=True``), given mode ``0666 & ~umask``
    and renamed to ``path``; on an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (UTF-8; non-UTF-8 file names carried as surrogates are written back as bytes)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    return path


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None: JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as standard JSON atomically (non-finite floats become null)."""
    return write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def staging_dir(out: str | Path, tag: str = "staging") -> Iterator[Path]:
    """Yield a fresh folder beside ``out``; on success move its entries into ``out`` one by one.

    Each entry replaces its namesake in ``out`` with one rename, so an interrupted move leaves every
    file in ``out`` whole (old or new). On an exception the staging folder is removed.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{tag}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted earlier run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        out.mkdir(parents=True, exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            dest = out / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
