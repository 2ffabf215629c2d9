"""Latent normalisation factors measured on a dataset: ``scaling_factor = 1 / std``, ``shift_factor = mean``.

Latent diffusion (Rombach et al. 2022, sec. 4.3.2 / appendix G) rescales latents "by the component-wise
standard deviation" so a diffusion model sees unit variance; LDM's ``scale_by_std`` computes
``1 / z.flatten().std()`` on posterior samples of a first batch, which gave SD's 0.18215. SD3/FLUX also
subtract a mean (``shift_factor``). Here the statistics run over the whole dataset (float64 sums over
every latent value) and each batch also gives its own factor: their spread across batches (and the
standard error of the mean, spread / sqrt(batches)) says how far the figure can be trusted.

Per-channel statistics (``channel_mean``/``channel_std``, float64 sums per channel) are what Playground
v2.5's ``latents_mean``/``latents_std`` are (``(z - mean) * scale / std``) and, over FLUX.2's 2x2 latent
patches (4C channels), what its BatchNorm's ``running_mean``/``running_var`` hold; ``write_factors``
stores either kind (``model/normalization.py``).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from ..convert import update_config, update_weights, vae_folder
from ..errors import InputError
from ..inference import encode_moments
from ..model import latent_patch, patchify, posterior
from ..utils.devices import randn
from ..utils.images import ImageError, find_images, load_image, pil_to_tensor
from .buckets import Transform
from .dataset import LatentDataset


@dataclass
class LatentStats:
    """Factors for ``(z - shift_factor) * scaling_factor``; ``shift_factor`` is None when not measured."""

    scaling_factor: float
    shift_factor: float | None
    mean: float
    std: float
    n_values: int
    n_batches: int
    batch_scaling_factors: list[float] = field(repr=False)
    channel_mean: list[float] | None = None  # per channel of the raw latents (of the 2x2 patches for FLUX.2)
    channel_std: list[float] | None = None  # population std per channel
    patch_size: tuple[int, int] = (1, 1)

    @property
    def spread(self) -> float:
        """Standard deviation of the per-batch scaling factors (0 with one batch)."""
        b = self.batch_scaling_factors
        return statistics.stdev(b) if len(b) > 1 else 0.0

    @property
    def sem(self) -> float:
        """Standard error of the scaling factor: spread / sqrt(batches)."""
        return self.spread / math.sqrt(max(1, self.n_batches))

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), spread=self.spread, sem=self.sem)


class _Accumulator:
    def __init__(self, patch: tuple[int, int] = (1, 1)) -> None:
        self.n, self.s, self.ss, self.batch = 0, 0.0, 0.0, []
        self.patch, self.cs, self.css = tuple(patch), None, None  # per-channel float64 sums

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        if self.patch != (1, 1):
            z = patchify(z, self.patch)  # (B, 4C, h/2, w/2): FLUX.2's BatchNorm channels
        self.n += z.numel()
        self.s += float(z.sum())
        self.ss += float((z * z).sum())
        cs, css = z.sum(dim=(0, 2, 3)), (z * z).sum(dim=(0, 2, 3))  # (C,)
        self.cs, self.css = (cs, css) if self.cs is None else (self.cs + cs, self.css + css)
        self.batch.append(1.0 / float(z.std(unbiased=False)))

    def result(self, shift: bool) -> LatentStats:
        if self.n == 0:
            raise InputError("no latents to measure: the dataset yielded no readable images")
        mean = self.s / self.n
        std = math.sqrt(max(self.ss / self.n - mean * mean, 0.0))
        if std == 0:
            raise InputError("latents have zero variance: cannot compute a scaling factor")
        per = self.n // self.cs.numel()  # values per channel
        cmean = self.cs / per
        cstd = (self.css / per - cmean * cmean).clamp_min(0.0).sqrt()
        return LatentStats(1.0 / std, mean if shift else None, mean, std, self.n, len(self.batch), self.batch,
                           cmean.tolist(), cstd.tolist(), self.patch)


def latent_stats_from_moments(moments: Iterable[tuple[torch.Tensor, torch.Tensor]], *, sample: bool = True,
                              seed: int = 0, shift: bool = True, patch: tuple[int, int] = (1, 1)) -> LatentStats:
    """Statistics of raw latents given batches of posterior (mean, logvar), each (B, C, h, w).

    ``sample=True`` measures posterior samples (what a diffusion model trained with sampling sees, as LDM
    does), drawn from a generator seeded with ``seed``; ``sample=False`` measures the means. ``patch``:
    FLUX.2's (2, 2) measures the patchified latents, whose channels its BatchNorm normalises.
    """
    g = torch.Generator().manual_seed(seed)
    acc = _Accumulator(patch)
    for mean, logvar in moments:
        z = mean.float().cpu()  # (B, C, h, w) raw
        if sample:
            z = posterior.sample(z, logvar.float().cpu(), randn(tuple(z.shape), g, "cpu"))
        acc.add(z)
    return acc.result(shift)


def compute_latent_stats(vae: torch.nn.Module, batches: Iterable[Any], *, sample: bool = True, seed: int = 0,
                         shift: bool = True, tiling: str = "auto", tile_size: int | None = None) -> LatentStats:
    """Scaling (1/std) and shift (mean) factors of ``vae``'s latents over image ``batches``
    (each a (B, 3, H, W) tensor in [-1, 1], or anything ``inference.encode`` accepts)."""
    moments = (encode_moments(vae, x, tiling=tiling, tile_size=tile_size) for x in batches)
    return latent_stats_from_moments(moments, sample=sample, seed=seed, shift=shift, patch=latent_patch(vae))


def write_factors(model: str | Path, stats: LatentStats, *, per_channel: bool = False) -> Path:
    """Store the measured normalisation in a diffusers model folder (atomically); returns the file written.

    FLUX.2 (AutoencoderKLFlux2): the per-channel mean and variance of the patchified latents become the
    BatchNorm's ``running_mean``/``running_var`` in the weights file. Otherwise config.json gets
    ``scaling_factor``/``shift_factor``, or with ``per_channel`` ``latents_mean``/``latents_std`` (the
    scaling_factor kept if the model already normalises per channel, else 1.0: unit variance).
    """
    folder = vae_folder(model)
    cfg = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    if cfg.get("_class_name") == "AutoencoderKLFlux2":
        if tuple(stats.patch_size) != tuple(cfg.get("patch_size", (2, 2))):
            raise InputError(f"{model}: a FLUX.2 VAE needs statistics of its {cfg.get('patch_size')} latent patches; "
                             f"these were measured on {stats.patch_size}")
        var = [s * s for s in stats.channel_std]
        return update_weights(model, {"bn.running_mean": torch.tensor(stats.channel_mean), "bn.running_var": torch.tensor(var)})
    if per_channel:
        scale = cfg.get("scaling_factor", 1.0) if cfg.get("latents_mean") is not None else 1.0
        return update_config(model, latents_mean=stats.channel_mean, latents_std=stats.channel_std,
                             scaling_factor=scale, shift_factor=None)
    clear = {"latents_mean": None, "latents_std": None} if cfg.get("latents_mean") is not None else {}  # else they win
    return update_config(model, scaling_factor=stats.scaling_factor, shift_factor=stats.shift_factor, **clear)


class _CenterCrops(Dataset):
    """Image files as (3, N, N) tensors in [-1, 1], centre-cropped (``Transform.fixed``); None for unreadable ones."""

    def __init__(self, files: list[Path], resolution: int) -> None:
        self.files, self.transform = files, Transform.fixed(resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            return pil_to_tensor(self.transform(load_image(self.files[i]))[0])  # (3, N, N) in [-1, 1]
        except ImageError as e:
            print(f"warning: skipped {e}")
            return None


def _stack(items: list[torch.Tensor | None]) -> torch.Tensor | None:
    items = [t for t in items if t is not None]
    return torch.stack(items) if items else None


def stats_of_cache(root: str | Path, *, batch_size: int = 8, limit: int | None = None, sample: bool = True,
                   seed: int = 0, shift: bool = True) -> LatentStats:
    """Factors from an encode cache's stored moments (no encoder needed); ``limit``: the first K samples."""
    ds = LatentDataset(root)
    idx = list(range(len(ds)))[: limit or None]
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    moments = ((torch.stack([ds.moments(i)[0] for i in b]), torch.stack([ds.moments(i)[1] for i in b])) for b in batches)
    return latent_stats_from_moments(moments, sample=sample, seed=seed, shift=shift, patch=ds.normalization.patch)


def stats_of_folder(vae: torch.nn.Module, data: str | Path, *, resolution: int = 256, batch_size: int = 8,
                    limit: int | None = None, sample: bool = True, seed: int = 0, shift: bool = True,
                    num_workers: int = 2, tiling: str = "auto", tile_size: int | None = None,
                    progress: bool = True) -> LatentStats:
    """Factors from encoding the images under ``data``, centre-cropped to ``resolution`` pixels.

    ``limit``: a seeded random subset of K images (sorted order may group similar images).
    """
    from tqdm import tqdm

    files = find_images(data)
    if limit and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    loader = DataLoader(_CenterCrops(files, resolution), batch_size=batch_size, num_workers=num_workers, collate_fn=_stack)
    batches = (b for b in tqdm(loader, desc="stats", unit="batch", disable=not progress) if b is not None)
    return compute_latent_stats(vae, batches, sample=sample, seed=seed, shift=shift, tiling=tiling, tile_size=tile_size)
