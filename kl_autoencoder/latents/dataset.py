"""Reading a latent cache (``kl-autoencoder encode`` output) for diffusion training.

``LatentDataset[i]`` gives normalised latents by the rule the manifest records (``latent_normalization``:
``(z - shift) * scale``, per-channel mean/std, FLUX.2's patchified BatchNorm; ``model/normalization.py``;
a cache with only ``scaling_factor``/``shift_factor`` uses those) and the sample's metadata.
``z`` is the stored posterior mean, or with ``sample=True`` a fresh posterior
sample ``mean + exp(logvar / 2) * eps``. Reproducibility: ``eps`` comes from a torch.Generator seeded
with ``sample_seed(seed, index, epoch)`` (a sha256, the same in every process and DataLoader worker),
so the same (seed, index, epoch) always gives the same sample and each epoch a new one; call
``set_epoch(e)`` at the start of every epoch, as with DistributedSampler (DataLoader workers copy the
dataset when an epoch starts unless ``persistent_workers=True``, so use the default there).

A cache of several resolutions (``encode --resolution 256,512``) is read at one: ``resolution=512``
(default: the first). A cache encoded with ``--flip both`` holds the mirror image's moments too;
``random_flip=True`` returns them for about half the accesses, chosen by ``derive_seed("flip", seed,
index, epoch)``, so the choice is as reproducible as the posterior sample. Captions and metadata are
read from the shard headers (the manifest does not repeat them).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..errors import InputError
from ..model import normalization_from_manifest, posterior
from ..utils.devices import randn
from ..utils.seeding import derive_seed
from .format import CacheMismatchError, moment_names, read_manifest, shard_header


def sample_seed(seed: int, index: int, epoch: int) -> int:
    """The generator seed of the posterior sample of ``index`` in ``epoch`` (63-bit, process-independent)."""
    return derive_seed(seed, index, epoch)


class LatentDataset(Dataset):
    """Latents of an encode cache as a torch Dataset (see module doc).

    ``scaling_factor`` / ``shift_factor`` override the manifest's (e.g. after ``kl-autoencoder stats``).
    Items: ``{"latents": (C, h, w) float32 normalised ((4C, h/2, w/2) for FLUX.2), "index", "path", "sha256",
    "bucket": (w, h), "original_size": (W, H), "crop_box": (left, top, right, bottom) in original pixels, "flip": whether
    these are the mirror image's latents, "caption": str ("" when the sample had none), "metadata": JSON}``.
    """

    def __init__(self, root: str | Path, *, sample: bool = False, seed: int = 0,
                 scaling_factor: float | None = None, shift_factor: float | None = None, max_open_shards: int = 16,
                 resolution: int | None = None, random_flip: bool = False) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.samples: list[dict[str, Any]] = self.manifest["samples"]
        self.resolution, self.variant = self._variant(resolution)
        if random_flip and self.manifest.get("flip", "none") != "both":
            raise InputError(f"{self.root}: holds no mirror-image latents; encode with --flip both for random_flip=True")
        self.random_flip = random_flip
        self.normalization = normalization_from_manifest(self.manifest, scaling_factor=scaling_factor, shift_factor=shift_factor)
        self.sample, self.seed, self.epoch = sample, seed, 0
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _variant(self, resolution: int | None) -> tuple[int | None, str]:
        """(resolution read, tensor-name suffix): "" for the first resolution, "@512" for another."""
        m = self.manifest
        stored = m.get("resolutions") or ([m["resolution"]] if m.get("resolution") else [])
        if resolution is None or (stored and resolution == stored[0]):
            return (stored[0] if stored else None), ""
        if resolution not in stored:
            have = ", ".join(map(str, stored)) or "aspect-ratio buckets only"
            raise InputError(f"{self.root}: no latents at resolution {resolution} (stored: {have}); "
                             f"encode with --resolution {','.join(map(str, stored + [resolution]))}")
        return resolution, f"@{resolution}"

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_open"] = OrderedDict()  # file handles stay in their process; workers open their own
        return d

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def scaling_factor(self) -> float:
        return self.normalization.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.normalization.shift_factor or 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def buckets(self) -> list[tuple[int, int]]:
        """Bucket (w, h) of every index: give it to ``BucketBatchSampler``."""
        return [self._bucket(s) for s in self.samples]

    def _bucket(self, s: dict[str, Any]) -> tuple[int, int]:
        return (self.resolution, self.resolution) if self.variant else tuple(s["bucket"])

    def _entry(self, name: str) -> tuple[Any, dict[str, dict[str, Any]]]:
        """(open shard, its header's samples by key), least recently used closed first."""
        e = self._open.pop(name, None)
        if e is None:
            e = self._open_shard(self.root / name)
            if len(self._open) >= self.max_open_shards:
                self._open.popitem(last=False)
        self._open[name] = e  # most recently used last
        return e

    def _open_shard(self, path: Path) -> tuple[Any, dict[str, dict[str, Any]]]:
        """A shard the manifest names, refused in one line when it was not written by this cache's job
        (another model, dtype or transform: its ``identity`` differs) or is not a whole shard."""
        try:
            f = safe_open(str(path), framework="pt")
        except Exception:  # noqa: BLE001 - safetensors' own error types
            shard_header(path)  # raises the one-line CacheMismatchError naming the file
            raise
        header = f.metadata() or {}
        try:
            identity = json.loads(header["identity"])
            samples = json.loads(header["samples"])
        except (KeyError, json.JSONDecodeError):
            raise CacheMismatchError(f"{path}: not a kl-autoencoder latent shard; run the same encode command "
                                     "again to rebuild the cache") from None
        want = self.manifest.get("identity")
        if want is not None and identity != want:
            diff = [k for k in want if identity.get(k) != want.get(k)] or ["identity"]
            raise CacheMismatchError(f"{path}: made with a different {', '.join(diff)} than {self.root / 'manifest.json'}; "
                                     "run the same encode command again to rebuild the cache")
        return f, {s["key"]: s for s in samples}

    def _shard(self, name: str) -> Any:
        return self._entry(name)[0]

    def flipped(self, index: int) -> bool:
        """Whether access ``index`` in this epoch returns the mirror image (``random_flip``; see module doc)."""
        return self.random_flip and bool(derive_seed("flip", self.seed, index, self.epoch) & 1)

    def moments(self, index: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored raw posterior (mean, logvar), each (C, h, w) float32, of the image or (``flip``) its mirror."""
        s = self.samples[index]
        f = self._shard(s["shard"])
        mean, logvar = moment_names(s["key"], self.variant + (".flip" if flip else ""))
        return f.get_tensor(mean).float(), f.get_tensor(logvar).float()

    def text(self, index: int) -> tuple[str, Any]:
        """(caption, metadata) of ``index`` from its shard header ("" and {} when it had none)."""
        s = self.samples[index]
        header = self._entry(s["shard"])[1][s["key"]]
        return header.get("caption") or "", header.get("metadata", {})

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        flip = self.flipped(index)
        mean, logvar = self.moments(index, flip)
        z = mean  # (C, h, w) raw
        if self.sample:
            g = torch.Generator().manual_seed(sample_seed(self.seed, index, self.epoch))
            z = posterior.sample(mean, logvar, randn(tuple(mean.shape), g, mean.device))
        s = self.samples[index]
        caption, metadata = self.text(index)
        return {
            "latents": self.normalization.normalize(z[None])[0],  # (C, h, w) normalised
            "index": index,
            "path": s["path"],
            "sha256": s["sha256"],
            "bucket": self._bucket(s),
            "original_size": tuple(s["size"]),
            "crop_box": tuple(s["crop_box"]),
            "flip": flip,
            "caption": caption,
            "metadata": metadata,
        }

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """DataLoader collate_fn: ``{"latents": (B, C, h, w), "meta": [per-item metadata]}`` (one bucket per batch)."""
        return {"latents": torch.stack([it["latents"] for it in items]),
                "meta": [{k: v for k, v in it.items() if k != "latents"} for it in items]}
