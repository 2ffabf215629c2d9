"""Latent normalisation factors measured on a dataset: ``scaling_factor = 1 / std``, ``shift_factor = mean``.

Latent diffusion (Rombach et al. 2022, sec. 4.3.2 / appendix G) rescales latents "by the component-wise
standard deviation" so a diffusion model sees unit variance; LDM's ``scale_by_std`` computes
``1 / z.flatten().std()`` on posterior samples of a first batch, which gave SD's 0.18215. SD3/FLUX also
subtract a mean (``shift_factor``). Here the statistics run over the whole dataset (float64 sums over
every latent value) and each batch also gives its own factor: their spread across batches (and the
standard error of the mean, spread / sqrt(batches)) says how far the figure can be trusted.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from ..convert import update_config
from ..errors import InputError
from ..inference import encode_moments
from ..model import posterior
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
    def __init__(self) -> None:
        self.n, self.s, self.ss, self.batch = 0, 0.0, 0.0, []

    def add(self, z: torch.Tensor) -> None:
        z = z.detach().double()
        self.n += z.numel()
        self.s += float(z.sum())
        self.ss += float((z * z).sum())
        self.batch.append(1.0 / float(z.std(unbiased=False)))

    def result(self, shift: bool) -> LatentStats:
        if self.n == 0:
            raise InputError("no latents to measure: the dataset yielded no readable images")
        mean = self.s / self.n
        std = math.sqrt(max(self.ss / self.n - mean * mean, 0.0))
        if std == 0:
            raise InputError("latents have zero variance: cannot compute a scaling factor")
        return LatentStats(1.0 / std, mean if shift else None, mean, std, self.n, len(self.batch), self.batch)


def latent_stats_from_moments(moments: Iterable[tuple[torch.Tensor, torch.Tensor]], *, sample: bool = True,
                              seed: int = 0, shift: bool = True) -> LatentStats:
    """Statistics of raw latents given batches of posterior (mean, logvar), each (B, C, h, w).

    ``sample=True`` measures posterior samples (what a diffusion model trained with sampling sees, as LDM
    does), drawn from a generator seeded with ``seed``; ``sample=False`` measures the means.
    """
    g = torch.Generator().manual_seed(seed)
    acc = _Accumulator()
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
    return latent_stats_from_moments(moments, sample=sample, seed=seed, shift=shift)


def write_factors(model: str | Path, stats: LatentStats) -> Path:
    """Store the factors in a diffusers model folder's config.json (atomically); returns its path."""
    return update_config(model, scaling_factor=stats.scaling_factor, shift_factor=stats.shift_factor)


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
    return latent_stats_from_moments(moments, sample=sample, seed=seed, shift=shift)


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
