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
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..model import normalization_from_manifest, posterior
from ..utils.devices import randn
from ..utils.seeding import derive_seed
from .format import read_manifest


def sample_seed(seed: int, index: int, epoch: int) -> int:
    """The generator seed of the posterior sample of ``index`` in ``epoch`` (63-bit, process-independent)."""
    return derive_seed(seed, index, epoch)


class LatentDataset(Dataset):
    """Latents of an encode cache as a torch Dataset (see module doc).

    ``scaling_factor`` / ``shift_factor`` override the manifest's (e.g. after ``kl-autoencoder stats``).
    Items: ``{"latents": (C, h, w) float32 normalised ((4C, h/2, w/2) for FLUX.2), "index", "path", "sha256",
    "bucket": (w, h), "original_size": (W, H), "crop_box": (left, top, right, bottom) in original pixels, "flip": False}``.
    """

    def __init__(self, root: str | Path, *, sample: bool = False, seed: int = 0,
                 scaling_factor: float | None = None, shift_factor: float | None = None, max_open_shards: int = 16) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.samples: list[dict[str, Any]] = self.manifest["samples"]
        self.normalization = normalization_from_manifest(self.manifest, scaling_factor=scaling_factor, shift_factor=shift_factor)
        self.sample, self.seed, self.epoch = sample, seed, 0
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[str, Any] = OrderedDict()

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
        return [tuple(s["bucket"]) for s in self.samples]

    def _shard(self, name: str) -> Any:
        f = self._open.pop(name, None)
        if f is None:
            f = safe_open(str(self.root / name), framework="pt")
            if len(self._open) >= self.max_open_shards:
                self._open.popitem(last=False)
        self._open[name] = f  # most recently used last
        return f

    def moments(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored raw posterior (mean, logvar), each (C, h, w) float32."""
        s = self.samples[index]
        f = self._shard(s["shard"])
        return f.get_tensor(f"{s['key']}.mean").float(), f.get_tensor(f"{s['key']}.logvar").float()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        mean, logvar = self.moments(index)
        z = mean  # (C, h, w) raw
        if self.sample:
            g = torch.Generator().manual_seed(sample_seed(self.seed, index, self.epoch))
            z = posterior.sample(mean, logvar, randn(tuple(mean.shape), g, mean.device))
        s = self.samples[index]
        return {
            "latents": self.normalization.normalize(z[None])[0],  # (C, h, w) normalised
            "index": index,
            "path": s["path"],
            "sha256": s["sha256"],
            "bucket": tuple(s["bucket"]),
            "original_size": tuple(s["size"]),
            "crop_box": tuple(s["crop_box"]),
            "flip": bool(s["flip"]),
        }

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """DataLoader collate_fn: ``{"latents": (B, C, h, w), "meta": [per-item metadata]}`` (one bucket per batch)."""
        return {"latents": torch.stack([it["latents"] for it in items]),
                "meta": [{k: v for k, v in it.items() if k != "latents"} for it in items]}
