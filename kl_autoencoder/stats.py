"""Latent normalisation factors measured on a dataset: ``scaling_factor = 1 / std``, ``shift_factor = mean``.

Latent diffusion (Rombach et al. 2022, sec. 4.3.2 / appendix G) rescales latents "by the component-wise
standard deviation" so a diffusion model sees unit variance; LDM's ``scale_by_std`` computes
``1 / z.flatten().std()`` on posterior samples of a first batch, which gave SD's 0.18215. SD3/FLUX also
subtract a mean (``shift_factor``). Here the statistics run over the whole dataset (float64 sums over
every latent value) and each batch also gives its own factor: their spread across batches (and the
standard error of the mean, spread / sqrt(batches)) says how far the figure can be trusted.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from . import api


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
            raise ValueError("no latents to measure: the dataset yielded no readable images")
        mean = self.s / self.n
        std = math.sqrt(max(self.ss / self.n - mean * mean, 0.0))
        if std == 0:
            raise ValueError("latents have zero variance: cannot compute a scaling factor")
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
            z = z + torch.exp(0.5 * logvar.float().cpu()) * torch.randn(z.shape, generator=g)
        acc.add(z)
    return acc.result(shift)


def compute_latent_stats(vae: torch.nn.Module, batches: Iterable[Any], *, sample: bool = True, seed: int = 0,
                         shift: bool = True, tiling: str = "auto", tile_size: int | None = None) -> LatentStats:
    """Scaling (1/std) and shift (mean) factors of ``vae``'s latents over image ``batches``
    (each a (B, 3, H, W) tensor in [-1, 1], or anything ``api.encode`` accepts)."""
    moments = (api.encode_moments(vae, x, tiling=tiling, tile_size=tile_size) for x in batches)
    return latent_stats_from_moments(moments, sample=sample, seed=seed, shift=shift)


def _config_path(model: str | Path) -> Path:
    p = Path(model)
    cfg = p / "config.json" if (p / "config.json").is_file() else p / "vae" / "config.json"
    if not p.is_dir() or not cfg.is_file():
        raise FileNotFoundError(f"{model}: --write needs a diffusers model folder with a config.json (export one with `kl-autoencoder export`)")
    return cfg


def write_factors(model: str | Path, stats: LatentStats) -> Path:
    """Store the factors in a diffusers model folder's config.json (atomically); returns its path."""
    cfg = _config_path(model)
    data = json.loads(cfg.read_text())
    data["scaling_factor"] = stats.scaling_factor
    data["shift_factor"] = stats.shift_factor
    api.save_json(data, cfg)
    return cfg


# ----------------------------------------------------------------------------- command


class _Images(Dataset):
    def __init__(self, files: list[Path], resolution: int) -> None:
        from .buckets import Transform

        self.files, self.transform = files, Transform.fixed(resolution)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        from .images import ImageError, load_image, pil_to_tensor

        try:
            return pil_to_tensor(self.transform(load_image(self.files[i]))[0])  # (3, N, N) in [-1, 1]
        except ImageError as e:
            print(f"warning: skipped {e}")
            return None


def _stack(items: list[torch.Tensor | None]) -> torch.Tensor | None:
    items = [t for t in items if t is not None]
    return torch.stack(items) if items else None


def cmd_stats(args: argparse.Namespace) -> int:
    from .cli import resolve_model, tiling_kwargs

    data = Path(args.data)
    sample = args.mode == "sample"
    if args.write:
        _config_path(args.model)  # fail before the work, not after
    if (data / "manifest.json").is_file():  # an encode cache: its stored moments, no encoder needed
        from .latent_dataset import LatentDataset

        ds = LatentDataset(data)
        idx = list(range(len(ds)))[: args.limit or None]
        batches = [idx[s : s + args.batch_size] for s in range(0, len(idx), args.batch_size)]
        moments = ((torch.stack([ds.moments(i)[0] for i in b]), torch.stack([ds.moments(i)[1] for i in b])) for b in batches)
        stats = latent_stats_from_moments(moments, sample=sample, seed=args.seed, shift=not args.no_shift)
        vae = None
    else:
        from .images import find_images

        vae = resolve_model(args.model)
        files = find_images(data)
        if args.limit and args.limit < len(files):  # a seeded random subset: sorted order may group similar images
            files = sorted(random.Random(args.seed).sample(files, args.limit))
        loader = DataLoader(_Images(files, args.resolution), batch_size=args.batch_size, num_workers=args.num_workers,
                            collate_fn=_stack)
        from tqdm import tqdm

        batches = (b for b in tqdm(loader, desc="stats", unit="batch") if b is not None)
        stats = compute_latent_stats(vae, batches, sample=sample, seed=args.seed, shift=not args.no_shift, **tiling_kwargs(args))
    print(json.dumps({k: v for k, v in stats.to_dict().items() if k != "batch_scaling_factors"}, indent=2))
    print(f"scaling_factor {stats.scaling_factor:.5f} +- {stats.sem:.5f} (spread across {stats.n_batches} batches "
          f"{stats.spread:.5f}), shift_factor {stats.shift_factor}")
    if args.write:
        print(f"wrote scaling_factor and shift_factor to {write_factors(args.model, stats)}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    from .cli import MODEL_HELP, add_tiling_args

    p = sub.add_parser(
        "stats",
        help="measure latent scaling (1/std) and shift (mean) factors on a dataset",
        description="Encode DATA (an image folder, centre-cropped to --resolution; or an `encode` output folder, "
        "whose stored moments are used) and print scaling_factor = 1/std and shift_factor = mean of the latents, "
        "with their spread across batches. --write stores them in MODEL's config.json.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("data", metavar="DATA", help="image folder (recursive) or an encode output folder")
    p.add_argument("--write", action="store_true", help="store the factors in MODEL's config.json (a diffusers folder)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8); one factor per batch for the spread")
    p.add_argument("--limit", type=int, default=None, help="use at most K images (a seeded random subset)")
    p.add_argument("--resolution", type=int, default=256, help="centre crop size for image folders (default 256)")
    p.add_argument("--mode", choices=["sample", "mean"], default="sample",
                   help="measure posterior samples (default, as LDM) or posterior means")
    p.add_argument("--no-shift", action="store_true",
                   help="write shift_factor null (SD 1.x/2.x layout: diffusers SD pipelines ignore shift_factor)")
    p.add_argument("--seed", type=int, default=0, help="seed for posterior samples and --limit (default 0)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (0: in-process)")
    add_tiling_args(p)
    p.set_defaults(func=cmd_stats)
