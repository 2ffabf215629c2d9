"""Latent files as ``decode`` reads them, and decoding them to images.

The encode job itself is ``writer.encode_dataset``; reading a cache for training is ``dataset.py``.
Decoding accepts three kinds of LATENTS:
  * an encode output folder or one of its shards: the stored posterior means, raw latents;
  * a .safetensors / .pt file with one tensor (or a ``latents`` entry), (B, C, h, w) or (C, h, w):
    normalised latents (what a diffusion model samples: ``(z - shift) * scale``, or the VAE's own rule,
    ``model/normalization.py``), or raw with ``--raw``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ..convert.weight_files import read_safetensors
from ..errors import InputError, InputTypeError
from ..inference import check_latents, decode
from ..model import normalize_latents
from .dataset import LatentDataset
from .format import FORMAT, shard_header

Named = tuple[str, torch.Tensor]  # (output name without suffix, (C, h, w) latents)


def _tensor_file(path: Path) -> torch.Tensor:
    """The one tensor (or the ``latents`` entry) of a .safetensors / .pt file; never unpickles code."""
    if path.suffix == ".safetensors":
        obj: Any = read_safetensors(path)[0]  # CheckpointError naming the file when the bytes are not safetensors
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        except pickle.UnpicklingError:
            raise InputError(f"{path}: refused: this pickle needs code to load; nothing was run. Save the latents "
                             "with safetensors (safetensors.torch.save_file) or torch.save of a plain tensor") from None
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises anything
            raise InputError(f"{path}: not a readable tensor file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if isinstance(obj, dict):
        if "latents" in obj:
            obj = obj["latents"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise InputError(f"{path}: holds {len(obj)} entries ({', '.join(list(obj)[:5])}); save one tensor, or name it 'latents'")
    if not isinstance(obj, torch.Tensor):
        raise InputTypeError(f"{path}: expected a tensor, found {type(obj).__name__}")
    return obj


def _is_shard(path: Path) -> bool:
    """A .safetensors file whose header says it is a latent-cache shard (unreadable headers raise, naming the file)."""
    return path.suffix == ".safetensors" and shard_header(path).get("format") == FORMAT  # one line if unreadable


def read_latents(path: str | Path) -> tuple[list[Named], bool]:
    """LATENTS -> ([(name, latents (C, h, w))], is_raw_cache). Names follow the sources (or the index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such latent file or folder")
    if path.is_dir() or _is_shard(path):
        if path.is_dir():
            ds = LatentDataset(path)
            items = [(s["path"], ds.moments(i)[0]) for i, s in enumerate(ds.samples)]
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                samples = json.loads(f.metadata()["samples"])
                items = [(s["path"], f.get_tensor(f"{s['key']}.mean").float()) for s in samples]
        return _png_names(items), True
    t = _tensor_file(path)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise InputError(f"{path}: expected latents shaped (B, C, h, w) or (C, h, w), got {tuple(t.shape)}")
    return [(f"{i:05d}", t[i]) for i in range(t.shape[0])], False


def _png_names(items: list[Named]) -> list[Named]:
    """Source paths -> output names: ``dir/cat.jpg`` -> ``dir/cat``; on a clash keep the suffix (``cat.jpg``)."""
    stems = [str(Path(p).with_suffix("")) if p else "image" for p, _ in items]
    clash = {s for s in stems if stems.count(s) > 1}
    return [((p or "image") if s in clash else s, t) for s, (p, t) in zip(stems, items)]


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, *, raw: bool = False, tiling: str = "auto",
                   tile_size: int | None = None) -> torch.Tensor:
    """Latents (B, C, h, w), normalised (or raw) -> images (B, 3, 8h, 8w) in [-1, 1] (clamped)."""
    latents = check_latents(vae, latents, raw=raw).float()
    if raw:
        latents = normalize_latents(vae, latents)
    return decode(vae, latents, tiling=tiling, tile_size=tile_size).clamp(-1, 1)
