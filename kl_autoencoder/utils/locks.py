"""One job per output folder: an exclusive lock held for the whole job.

Two jobs writing into one folder (two ``encode`` runs with other settings, two trainers in one run
directory) would interleave their files; the second one is refused instead, with one line naming the
holder. The lock is ``filelock``'s (``flock`` on POSIX, ``LockFileEx`` on Windows): the operating system
drops it when the holding process dies, so a lock left by a killed job is simply taken over. Who holds it
(PID, command, start time) is written beside it, since the lock file itself carries nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from ..errors import KLAutoencoderError

LOCK_NAME = ".kl-autoencoder.lock"


class LockedError(KLAutoencoderError):
    """The output folder is in use by another job."""


def _holder(info: Path, wait_s: float = 1.0) -> str:
    """Who holds the lock. The holder writes ``info`` just after taking the lock, so a job refused in that
    instant finds it missing or half written: it looks again for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            h = json.loads(info.read_text())
            return f"PID {h['pid']}, `{h['command']}`, since {h['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)


@contextlib.contextmanager
def output_lock(folder: str | Path, job: str, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold the exclusive lock ``name`` in ``folder`` (created if needed) for the block; LockedError if another
    job holds it. One lock per output folder; a job writing one file (a CSV) names the lock after the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / f"{name}.json"
    lock = FileLock(folder / name, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"{folder}: in use by another {job} job ({_holder(info)}); wait for it to finish, "
                          "or choose another output") from None
    try:
        info.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[:8]),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        yield
    finally:
        info.unlink(missing_ok=True)
        lock.release()
