"""Reading weight files safely: safetensors, and pickles only through ``torch.load(weights_only=True)``.

A ``.ckpt``/``.pt``/``.bin``/``.pth`` file is a Python pickle, and an ordinary unpickler runs whatever
code the file names (``__reduce__`` -> ``os.system``). torch's weights-only unpickler allows tensors,
containers and numbers only; anything else is refused here with a one-line error and nothing runs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError

# Picks the keys worth reading (e.g. only the VAE of a 4 GB SD checkpoint); None reads every key.
Selector = Callable[[list[str]], list[str]] | None

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


class CheckpointError(InputError):
    """A weights file that cannot be read or used; the message names the file and the fix."""


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8


def read_safetensors(path: Path, select: Selector = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in (select(keys) if select else keys)}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


def _torch_load(path: Path) -> object:
    try:  # memory-mapped: the weights a selector drops are never read from disk
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-1.6, non-zip) format


def read_pickle(path: Path, select: Selector = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``torch.load(weights_only=True)``: tensors, dicts, lists and numbers only; code is never run."""
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        # torch's message names the offending global, e.g. "Unsupported global: GLOBAL posix.system"
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln), "")
        raise CheckpointError(
            f"{path}: refused: this pickle needs code to load ({why or 'not weights-only'}); nothing was run. "
            "Convert it to .safetensors in an environment you trust, or ask its author for a safetensors file"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise anything (KeyError, EOFError, RuntimeError...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg if len(msg) > 8 else f"{type(e).__name__}: {msg}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg})") from None
    # PyTorch Lightning / CompVis checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    if select:
        tensors = {k: tensors[k] for k in select(list(tensors))}
    return tensors, {}


def read_weights(path: str | Path, select: Selector = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Any supported weights file -> (name -> CPU tensor, safetensors metadata or {}); ``select`` picks keys.

    The format is decided by content, not only the suffix: a safetensors file named ``.bin`` still reads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported weights file type; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if _looks_like_safetensors(path):
        return read_safetensors(path, select)
    if path.suffix.lower() == ".safetensors":
        raise CheckpointError(f"{path}: not a safetensors file (bad header); is the download complete?")
    return read_pickle(path, select)
