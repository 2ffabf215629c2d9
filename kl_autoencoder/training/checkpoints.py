"""Training checkpoints: written atomically, pruned to the last N, read without unpickling code."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..convert import CheckpointError
from ..utils.files import atomic_path

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
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable kl-autoencoder checkpoint ({first[:200]})") from None


def load_latest(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint; a corrupt newest one is reported and the previous one used."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping %s", e)
    return None
