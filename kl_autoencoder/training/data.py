"""Training images: a recursive folder, robust decoding, crops keyed by (seed, epoch, index).

Every random choice (sample order, crop, flip) is a function of the seed, the epoch and the sample
index, never of a worker's RNG state, so a resumed run sees exactly the images it would have seen.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..utils.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    find_images,
    load_image,
    pil_to_tensor,
)
from ..utils.seeding import derive_seed


class ImageFolder(Dataset):
    """Images under ``root`` as (3, crop, crop) tensors in [-1, 1].

    ``train=True``: random crop + optional horizontal flip; ``train=False``: centre crop.
    ``crop_sizes``: keys ``(index, epoch, micro)`` get a crop size drawn from these, the same for every
    sample of micro-batch ``micro`` (in every process), so a batch stacks; other keys use ``crop_size``.
    Unreadable files are skipped (the next file is used instead) and reported in the sample's
    ``failed`` list; images smaller than the crop are upscaled (``small_images="upscale"``, reported
    in ``upscaled``) or skipped (``"skip"``); images under ``min_size`` pixels are always skipped.
    """

    def __init__(
        self,
        root: str | Path | list[str | Path],
        crop_size: int,
        *,
        train: bool = True,
        random_flip: bool = True,
        small_images: str = "upscale",
        min_size: int = 8,
        resize: int | None = None,
        seed: int = 0,
        crop_sizes: tuple[int, ...] | None = None,
    ):
        roots = [Path(r) for r in (root if isinstance(root, (list, tuple)) else [root])]
        self.root = roots[0] if len(roots) == 1 else Path(" + ".join(map(str, roots)))
        self.files = [f for r in roots for f in find_images(r)]
        if not self.files:
            raise FileNotFoundError(
                f"{self.root}: no training images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) found, recursively"
            )
        self.crop_size, self.crop_sizes, self.train, self.random_flip = crop_size, crop_sizes, train, random_flip
        self.small_images, self.min_size, self.resize, self.seed = small_images, min_size, resize, seed

    def __len__(self) -> int:
        return len(self.files)

    def size_of(self, micro: int | None) -> int:
        """The crop size of micro-batch ``micro`` (pixels, square)."""
        if micro is None or not self.crop_sizes:
            return self.crop_size
        return self.crop_sizes[derive_seed("crop_size", self.seed, micro) % len(self.crop_sizes)]

    def _prepare(self, path: Path, rng: random.Random, c: int) -> tuple[torch.Tensor, bool]:
        img = load_image(path, min_size=self.min_size)
        upscaled = False
        if self.resize and min(img.size) != self.resize:
            s = self.resize / min(img.size)
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
        if min(img.size) < c:
            if self.small_images == "skip":
                raise ImageError(f"{path}: {img.width}x{img.height} is smaller than the {c}px crop (data.small_images=skip)")
            s = c / min(img.size)
            img = img.resize((max(c, round(img.width * s)), max(c, round(img.height * s))), Image.BICUBIC)
            upscaled = True
        if self.train:
            left, top = rng.randint(0, img.width - c), rng.randint(0, img.height - c)
        else:
            left, top = (img.width - c) // 2, (img.height - c) // 2
        img = img.crop((left, top, left + c, top + c))
        if self.train and self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), upscaled  # (3, c, c) in [-1, 1]

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        index, epoch, micro = (tuple(key) + (None,))[:3] if isinstance(key, tuple) else (key, 0, None)
        c = self.size_of(micro)
        failed: list[str] = []
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            rng = random.Random(derive_seed("crop", self.seed, epoch, i))  # the same in every process and worker
            try:
                pixels, upscaled = self._prepare(self.files[i], rng, c)
            except ImageError as e:
                failed.append(str(e))
                continue
            return {"pixels": pixels, "index": i, "failed": failed, "upscaled": [str(self.files[i])] if upscaled else []}
        raise ImageError(f"{self.root}: none of the {len(self.files)} image files is usable ({failed[0]})")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),  # (B, 3, c, c)
        "index": torch.tensor([s["index"] for s in samples]),
        "failed": [f for s in samples for f in s["failed"]],
        "upscaled": [u for s in samples for u in s["upscaled"]],
    }


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g, device="cpu").tolist()


class StreamSampler(Sampler):
    """An endless stream of (index, epoch, micro-batch) keys: epoch permutations laid end to end.

    Micro-batch ``m`` is stream positions [m*G, (m+1)*G) with G = batch_size * world_size; rank r
    takes the r-th slice of ``batch_size``. So two processes with batch b see exactly the images of
    one process with batch 2b, and starting at ``start_micro`` resumes mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start_micro: int = 0):
        self.n, self.b, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world_size, start_micro
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {epoch: epoch_permutation(self.n, self.seed, epoch)}
        return self._perms[epoch]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        m = self.start
        g = self.b * self.world
        while True:
            for j in range(self.b):
                epoch, pos = divmod(m * g + self.rank * self.b + j, self.n)
                yield self._perm(epoch)[pos], epoch, m
            m += 1
