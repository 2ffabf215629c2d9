"""Training checkpoints: written atomically, pruned to the last N readable ones, read without unpickling code."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..convert import CheckpointError
from ..utils.files import atomic_path, disk_full_says

log = logging.getLogger("kl_autoencoder")
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints in step order (oldest first)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """torch.save to a temp file, fsync, rename: a kill at any moment leaves the old checkpoints intact."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step:08d}.pt"
    previous = list_checkpoints(run_dir)
    need = previous[-1].stat().st_size if previous else _state_bytes(state)
    with disk_full_says(path, need, "a checkpoint"), atomic_path(path) as tmp:  # the temp file goes on failure
        torch.save(state, tmp)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _state_bytes(state: Any) -> int:
    """Bytes of the tensors in a checkpoint state (what torch.save writes, near enough)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable kl-autoencoder checkpoint ({first[:200]})") from None


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint, or None.

    Temp files of a write a crash interrupted are removed. An unreadable checkpoint (truncated, foreign) is
    renamed aside to ``*.pt.corrupt`` and reported once, so it counts for nothing afterwards: neither as the
    run's state nor among the last N that ``save_checkpoint`` keeps (which could otherwise delete the new,
    good checkpoints of a run whose every old one is broken).
    """
    d = checkpoint_dir(run_dir)
    for tmp in d.glob(".step-*.pt.tmp") if d.is_dir() else []:
        log.warning("removing %s: a checkpoint write that was interrupted", tmp)
        tmp.unlink(missing_ok=True)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            aside = path.with_name(path.name + ".corrupt")
            with contextlib.suppress(FileNotFoundError):  # every process resumes: another may have moved it first
                os.replace(path, aside)
            log.warning("%s; renamed to %s, resuming from the previous one", e, aside.name)
    return None
