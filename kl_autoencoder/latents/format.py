"""The latent cache format: shards, their headers, the manifest, and what makes two caches compatible.

Layout of an encode output folder OUT:
  ``shard-r{rank:03d}-{seq:06d}.safetensors``  tensors ``{key}.mean`` / ``{key}.logvar`` (C, h, w), raw
      (unnormalised) posterior moments of the first resolution, unflipped; further variants add a suffix
      before ``.mean``: ``@512`` for another resolution, ``.flip`` for the mirror image (``{key}@512.flip.mean``).
      Header metadata ``format``, ``identity`` (JSON) and ``samples`` (JSON list: key, path, sha256, size,
      crop_box, flip, bucket, shape, caption, metadata; ``tar`` / ``tar_key`` for webdataset inputs).
  ``manifest.json``  identity, factors, resolutions, flip, counts, skipped inputs and one entry per valid
      input (sorted by path) without its caption and metadata: those stay in the shard headers, so the
      manifest of a caption-heavy set stays small.
Writing: ``shards.py`` / ``writer.py``; reading: ``dataset.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import InputError
from .buckets import Transform
from .variants import Variants

FORMAT = "kl-autoencoder-latents/1"
SHARD_RE = re.compile(r"^shard-r(\d{3})-(\d{6})\.safetensors$")


class CacheMismatchError(InputError):
    """OUT holds latents made by another model, transform or dtype."""


def model_sha256(vae: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the model's identity in a cache."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # bytes view: numpy has no bf16
    return h.hexdigest()


def cache_identity(vae: torch.nn.Module, transform: Transform | Variants, dtype: str) -> dict[str, Any]:
    """What must match for shards to be mixed: weights, latent channels, pixel transform(s) and flips, stored dtype."""
    return {"model_sha256": model_sha256(vae), "latent_channels": int(vae.config.latent_channels),
            "transform": transform.to_json(), "dtype": dtype}


def moment_names(key: str, variant: str = "") -> tuple[str, str]:
    """Tensor names of one stored variant's (mean, logvar); ``variant`` from ``Variants.suffix`` ("" = primary)."""
    return f"{key}{variant}.mean", f"{key}{variant}.logvar"


def shard_header(path: Path) -> dict[str, str]:
    """The header metadata of a shard (raises CacheMismatchError naming a file that is not safetensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
        raise CacheMismatchError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [type(e).__name__])[0][:200]}); "
                                 "is it complete? (a shard of an encode cache: delete it, and running the same encode "
                                 "again re-encodes its samples)") from None


def scan_shards(out: Path) -> list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """(path, identity, samples) of every whole shard in ``out``, in name order."""
    found = []
    for p in sorted(out.glob("shard-r*.safetensors")):
        if not SHARD_RE.match(p.name):
            continue
        md = shard_header(p)
        if md.get("format") != FORMAT:
            raise CacheMismatchError(f"{p}: not a kl-autoencoder latent shard; move it out of {out}")
        found.append((p, json.loads(md["identity"]), json.loads(md["samples"])))
    return found


def load_manifest(path: Path) -> dict[str, Any] | None:
    """The JSON of ``path``, or None when it is cut short or not JSON (the shards hold the finished work)."""
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) else None


def read_manifest(root: str | Path) -> dict[str, Any]:
    """``root/manifest.json`` of a finished encode job (raises with the fix otherwise)."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {root} an output folder of `kl-autoencoder encode`?")
    m = load_manifest(path)
    if m is None:
        raise InputError(f"{path}: not valid JSON (cut short?); run the same encode command again: it rewrites the "
                         "manifest from the shards")
    if m.get("format") != FORMAT:
        raise InputError(f"{path}: format {m.get('format')!r} is not {FORMAT}")
    if not m.get("complete"):
        raise InputError(f"{path}: the encode job has not finished; run the same encode command again to complete it")
    return m
