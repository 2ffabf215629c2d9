"""What an encode job stores per sample: one crop per resolution, and optionally its mirror image.

``--resolution 256,512`` stores both centre crops of every sample in one cache (mosaicml/diffusion's
``precompute_latents.py`` keeps ``latents_256`` and ``latents_512`` the same way); ``--flip both``
also stores the moments of the horizontally mirrored crop (kohya-ss sd-scripts' ``latents_flipped``),
so a trainer can flip without a second encode. The mirror is taken of the transformed crop, as a
training-time ``RandomHorizontalFlip`` would. The first resolution is the primary variant: its tensors
keep the plain names (``format.moment_names``), so a cache of one unflipped resolution has the layout
(and the identity) it had before variants existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from .buckets import Bucket, Transform

FLIP_CHOICES = ("none", "both")


def parse_resolutions(value: int | str | Sequence[int] | None) -> tuple[int, ...]:
    """``256`` / ``"256,512"`` / ``[256, 512]`` -> (256, 512); None -> (256,)."""
    if value is None:
        return (256,)
    if isinstance(value, int):
        return (value,)
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(int(v) for v in items)
    except ValueError:
        raise InputError(f"--resolution {value!r}: expected integers separated by commas, e.g. 256,512") from None
    if not out or len(set(out)) != len(out):
        raise InputError(f"--resolution {value!r}: give each resolution once")
    return out


def parse_flip(flip: str | bool) -> bool:
    """``"both"`` / True: store the mirror image too; ``"none"`` / False: only the image."""
    if isinstance(flip, bool):
        return flip
    if flip not in FLIP_CHOICES:
        raise InputError(f"--flip {flip!r}: choose one of {', '.join(FLIP_CHOICES)}")
    return flip == "both"


@dataclass(frozen=True)
class Variants:
    """The stored variants of every sample: ``transforms[i]`` (i = 0 primary) x (unflipped[, flipped])."""

    transforms: tuple[Transform, ...]
    flip: bool = False

    @classmethod
    def make(cls, resolution: int | str | Sequence[int] | None = 256, buckets: int | None = None,
             flip: str | bool = "none") -> "Variants":
        if buckets:
            return cls((Transform.bucketed(int(buckets)),), parse_flip(flip))
        return cls(tuple(Transform.fixed(r) for r in parse_resolutions(resolution)), parse_flip(flip))

    @property
    def resolutions(self) -> list[int] | None:
        """Side of each centre-crop transform; None for an aspect-ratio bucket cache."""
        if self.transforms[0].kind != "center-crop":
            return None
        return [t.buckets[0][0] for t in self.transforms]

    def suffix(self, index: int, flipped: bool) -> str:
        """Tensor-name suffix of variant (transform ``index``, ``flipped``): "", "@512", ".flip", "@512.flip"."""
        res = "" if index == 0 else f"@{self.transforms[index].buckets[0][0]}"
        return res + (".flip" if flipped else "")

    def each(self) -> Iterator[tuple[int, bool]]:
        """(transform index, flipped) of every stored variant, primary first."""
        for i in range(len(self.transforms)):
            yield i, False
            if self.flip:
                yield i, True

    def to_json(self) -> dict[str, Any]:
        """The cache identity's ``transform``: unchanged from ``Transform.to_json`` for one unflipped crop."""
        first = self.transforms[0].to_json()
        if len(self.transforms) == 1 and not self.flip:
            return first
        if self.resolutions is None:  # one bucket transform
            return dict(first, flip=self.flip)
        return dict(first, buckets=[[r, r] for r in self.resolutions], flip=self.flip)

    def apply(self, img: Image.Image) -> tuple[list[torch.Tensor], tuple[int, int, int, int], list[Bucket]]:
        """The crops to encode: per transform (h, w, 3) uint8 pixels; the primary's crop box; every bucket."""
        pixels, buckets, box = [], [], None
        for t in self.transforms:
            out, b, bucket = t(img)
            box = box or b
            pixels.append(torch.from_numpy(np.asarray(out).copy()))  # (h, w, 3) uint8: 4x less IPC than float
            buckets.append(bucket)
        return pixels, box, buckets
