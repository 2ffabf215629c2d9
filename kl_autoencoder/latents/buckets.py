"""Image sizes for latent caching: a fixed centre crop or SDXL-style aspect-ratio buckets.

A bucket is a ``(width, height)`` pair in pixels. SDXL (Podell et al. 2023, sec. 2.3 "multi-aspect
training") trains on sides that are multiples of 64 with about 1024^2 pixels; kohya-ss
``make_bucket_resolutions`` builds them the same way: for each width step, the largest height
step whose area fits. An image goes to the bucket nearest in log aspect ratio, is centre-cropped to
that aspect ratio and resized to the bucket. Augmentation (flips, random crops) is never baked in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Sequence

from PIL import Image
from torch.utils.data import Sampler

from ..errors import InputError
from ..utils.images import center_box

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(area: int, *, step: int = 64, max_ratio: float = 4.0) -> list[Bucket]:
    """Buckets with sides multiples of ``step``, ``w * h <= area`` (the largest height per width)
    and aspect ratio ``w / h`` in ``[1 / max_ratio, max_ratio]``; sorted by aspect ratio."""
    if area < step * step:
        raise InputError(f"bucket area {area} is smaller than one {step}x{step} step; use e.g. {256 * 256}")
    out: set[Bucket] = set()
    w = step
    while w * w <= area:  # widths up to the square side; the transposes give the wide buckets
        h = (area // w) // step * step
        if w / h >= 1.0 / max_ratio:
            out.update({(w, h), (h, w)})
        w += step
    return sorted(out, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest to ``width / height`` in log aspect ratio (ties: the larger area)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def center_crop_box(width: int, height: int, bucket: Bucket) -> tuple[int, int, int, int]:
    """The largest centred box (left, top, right, bottom) of the bucket's aspect ratio, in image pixels."""
    bw, bh = bucket
    if width * bh > height * bw:  # image wider than the bucket: keep the full height
        cw, ch = max(1, min(width, round(height * bw / bh))), height
    else:
        cw, ch = width, max(1, min(height, round(width * bh / bw)))
    return center_box(width, height, cw, ch)


@dataclass(frozen=True)
class Transform:
    """How an image becomes the pixels that are encoded: nearest bucket, centre crop, bicubic resize.

    ``kind="center-crop"`` has one square bucket ``(N, N)``; ``kind="buckets"`` has ``make_buckets(area)``.
    """

    kind: str
    buckets: tuple[Bucket, ...]
    area: int | None = None

    @classmethod
    def fixed(cls, resolution: int) -> "Transform":
        if resolution <= 0 or resolution % 8:
            raise InputError(f"--resolution {resolution}: must be a positive multiple of 8 (the VAE downsamples by 8)")
        return cls("center-crop", ((resolution, resolution),))

    @classmethod
    def bucketed(cls, area: int, step: int = 64, max_ratio: float = 4.0) -> "Transform":
        return cls("buckets", tuple(make_buckets(area, step=step, max_ratio=max_ratio)), area)

    def to_json(self) -> dict[str, Any]:
        """Everything that decides the encoded pixels (part of a cache's identity)."""
        return {"kind": self.kind, "area": self.area, "buckets": [list(b) for b in self.buckets], "resample": "bicubic", "flip": False}

    def __call__(self, img: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int], Bucket]:
        """RGB image -> (image of the bucket's size, crop box in original pixels, bucket)."""
        bucket = nearest_bucket(img.width, img.height, self.buckets)
        box = center_crop_box(img.width, img.height, bucket)
        out = img.crop(box)
        if out.size != bucket:
            out = out.resize(bucket, Image.BICUBIC)
        return out, box, bucket


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that never mix buckets (e.g. ``LatentDataset.buckets()``).

    Each epoch shuffles indices within every bucket, cuts them into batches of ``batch_size`` and
    shuffles the batch order, all from ``seed + epoch`` (call ``set_epoch`` per epoch). The last, short
    batch of each bucket is kept unless ``drop_last``. Under accelerate, ``accelerator.prepare`` shards
    a DataLoader built with ``batch_sampler=`` across processes.
    """

    def __init__(self, buckets: Sequence[Hashable], batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}: must be >= 1")
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch = 0
        groups: dict[Hashable, list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(b, []).append(i)
        self.groups = [groups[k] for k in sorted(groups, key=repr)]  # a fixed order, whatever the input order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = []
        for idx in self.groups:
            idx = list(idx)
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                b = idx[s : s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = (lambda k: k // self.batch_size) if self.drop_last else (lambda k: -(-k // self.batch_size))
        return sum(n(len(g)) for g in self.groups)
