"""The per-sample work of an encode job, the same under every engine (DataLoader workers or Ray tasks/actors),
and ``Job``: what one process of the job works on.

``prepare``: a RawSample -> a record: sha256 of the image bytes; if a shard already holds those bytes
under this path, "unchanged" (or "recaption" when only the caption/metadata differ: the stored moments
are copied, nothing is encoded); else the image is decoded and cropped to every variant ("new").
``encode_records``: records sharing their buckets -> their moments, one encoder call per variant.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..inference import encode_moments
from ..inference.oom import split_on_oom
from ..utils.images import ImageError, load_image_bytes
from .sources import RawSample, Source
from .variants import Variants

log = logging.getLogger("kl_autoencoder")

Digests = dict[str, dict[str, set[str]]]  # path -> image sha256 -> text digests of the stored entries
Moments = dict[str, tuple[torch.Tensor, torch.Tensor]]  # variant suffix -> (mean, logvar), each (C, h, w)
STORED_FIELDS = ("path", "sha256", "size", "crop_box", "flip", "bucket", "caption", "metadata", "tar", "tar_key")


@dataclass
class Job:
    """One process's share of an encode job and everything the engines need."""

    vae: torch.nn.Module
    out: Path
    source: Source
    variants: Variants
    identity: dict[str, Any]
    store: torch.dtype  # dtype the moments are stored in
    device: torch.device
    rank: int
    world: int
    encode_kw: dict[str, Any] = field(default_factory=dict)
    batch_limit: int | None = None  # the largest batch that fitted after an out-of-memory halving

    @property
    def units(self) -> list[str]:
        """This process's units (files or whole tars): r, r + W, r + 2W, ..."""
        return self.source.units[self.rank :: self.world]


def text_digest(caption: str | None, metadata: Any) -> str:
    """sha256 of a sample's caption and metadata: tells a re-captioned sample from an unchanged one."""
    return hashlib.sha256(json.dumps([caption or "", metadata], sort_keys=True).encode()).hexdigest()


def prepare(raw: RawSample, known: Digests, variants: Variants) -> dict[str, Any]:
    """RawSample -> record with ``status`` new / unchanged / recaption / skipped (see module doc)."""
    base: dict[str, Any] = {"path": raw.path, **raw.extra}
    if raw.error is not None:
        return dict(base, status="skipped", reason=raw.error)
    sha = hashlib.sha256(raw.data).hexdigest()
    text = dict(caption=raw.caption or "", metadata=raw.metadata)
    stored = known.get(raw.path, {}).get(sha)
    if stored is not None:
        status = "unchanged" if text_digest(raw.caption, raw.metadata) in stored else "recaption"
        return dict(base, status=status, sha256=sha, **text)
    try:
        img = load_image_bytes(raw.data, raw.name)
    except ImageError as e:
        return dict(base, status="skipped", reason=str(e))
    pixels, box, buckets = variants.apply(img)
    _warn_upscaled(raw.path, img.size, box, buckets)
    return dict(base, status="new", sha256=sha, size=[img.width, img.height], crop_box=list(box), flip=False,
                bucket=list(buckets[0]), buckets=[list(b) for b in buckets], pixels=pixels, **text)


UPSCALE_WARNING = 4.0  # a crop blown up more than this carries almost no detail to learn from


def _warn_upscaled(path: str, size: tuple[int, int], box: tuple[int, int, int, int], buckets: list) -> None:
    """One line for an image far smaller than what it is encoded at (e.g. a 1x1 icon as 256 x 256)."""
    factor = max(b[0] for b in buckets) / max(1, box[2] - box[0])
    if factor > UPSCALE_WARNING:
        log.warning("%s: %dx%d pixels, upscaled %.0fx to %dx%d; its latents hold little detail", path, *size,
                    factor, *max(buckets))


def group_key(record: dict[str, Any]) -> tuple:
    """Records with equal keys have equally shaped crops in every variant: one encoder batch."""
    return tuple(map(tuple, record["buckets"]))


def stored_meta(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of a record that go into the shard header."""
    return {k: record[k] for k in STORED_FIELDS if k in record}


def encode_pixels(vae: torch.nn.Module, x: torch.Tensor, device: torch.device, encode_kw: dict[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder call: uint8 (B, h, w, 3) -> raw (mean, logvar), each (B, C, h/8, w/8) float32 on ``device``."""
    x = x.to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, h, w) in [-1, 1], as images.uint8_to_tensor
    return encode_moments(vae, x, pad=None, **encode_kw)


def log_split(batch: int, half: int) -> None:
    log.warning("encode: out of memory with a batch of %d; retrying as batches of %d (lower --batch-size to avoid it)",
                batch, half)


def encode_records(vae: torch.nn.Module, records: list[dict[str, Any]], variants: Variants, store: torch.dtype,
                   device: torch.device, encode_kw: dict[str, Any],
                   on_split: Callable[[int, int], None] | None = None) -> list[Moments]:
    """Moments of every variant of ``records`` (one ``group_key``), stored dtype, on the CPU.

    Out of memory halves the batch and retries (``inference/oom.py``); ``on_split(batch, half)`` hears of it."""
    out: list[Moments] = [{} for _ in records]
    for index, flipped in variants.each():
        x = torch.stack([r["pixels"][index] for r in records])  # (B, h, w, 3) uint8
        if flipped:
            x = x.flip(2)  # the mirror image: reverse the width axis
        parts = split_on_oom(lambda xs: encode_pixels(vae, xs, device, encode_kw), x, on_split=on_split)
        mean = torch.cat([m for m, _ in parts])  # (B, C, h/8, w/8)
        logvar = torch.cat([lv for _, lv in parts])
        mean, logvar = mean.to("cpu", store).contiguous(), logvar.to("cpu", store).contiguous()  # chunk() gave views
        suffix = variants.suffix(index, flipped)
        for i, moments in enumerate(out):
            moments[suffix] = (mean[i].clone(), logvar[i].clone())  # clone: safetensors refuses shared storage
    return out
