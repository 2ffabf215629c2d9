"""Approximate low-memory tiling: memory independent of the image size, at a measured cost in accuracy.

Exact tiling (``tiling.py``) keeps whole feature maps between GroupNorms, because their statistics
span the whole image, so its memory still grows with the image. Here every tile runs through the
whole network on its own (with the plain diffusers modules), so memory is the input, the output and
one tile's activations, whatever the image size. What that gives up, and how it is bounded:

1. GroupNorm statistics are not those of the image itself: they are measured on a preview, a mosaic
   of full-resolution crops spread over the image (``preview`` image pixels square; see ``mosaic``),
   and every tile is normalised with them.
2. A tile sees ``halo`` image pixels of context on each side; the network's receptive field is larger.
3. The mid-block attention runs over the tile and its halo, not the whole latent.

Small images (both sides <= ``preview``) are their own preview: their statistics are exact, and only 2
and 3 remain. The error against the untiled pass is measured by ``tools/bench_tiling.py accuracy`` and
reported in docs/benchmarks.md; use ``tiling="always"`` (exact) when it matters.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..model import decode_raw, downsample_factor, encoder_moments, split_moments
from .tiling import DEFAULT_TILE, _check_tile, group_norm_affine

DEFAULT_HALO = 64  # image pixels of context on each side of a tile
DEFAULT_PREVIEW = 512  # image pixels: the preview's longer side
PREVIEW_CROPS = 4  # the preview is a 4 x 4 mosaic of full-resolution crops

Stats = tuple[int, torch.Tensor, torch.Tensor]  # (count per group, mean (G,), m2 (G,)), float64


def _group_stats(x: torch.Tensor, groups: int) -> Stats:
    """Per-group count, mean and centred sum of squares of one image's map (1, C, ...) (or tokens (1, C, N))."""
    g = x.reshape(groups, -1).float()  # a group is C/G consecutive channels, all positions
    mean = g.mean(1, keepdim=True)
    m2 = (g - mean).square_().sum(1).double()  # centred first: no E[x^2] - E[x]^2 cancellation
    return g.shape[1], mean[:, 0].double(), m2


class _Norms:
    """Every GroupNorm of a network: plain (recording each one's statistics), or with fixed statistics."""

    def __init__(self, net: nn.Module):
        self.norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
        self.fixed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per norm: group (mean, var)
        self.seen: list[Stats | None] = [None] * len(self.norms)

    def _forward(self, i: int, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is None:
            self.seen[i] = _group_stats(x, norm.num_groups)
            return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        scale, shift = group_norm_affine(norm, *self.fixed[i], x.shape[1], x.dtype)
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)  # diffusers Attention normalises (B, C, N) tokens
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The statistics recorded by the last plain pass, as (mean, biased var) per group."""
        if any(s is None for s in self.seen):
            raise RuntimeError("tiling='approx': a GroupNorm was not run (unsupported network layout)")
        out = [(mean, m2 / n) for n, mean, m2 in self.seen]
        self.seen = [None] * len(self.norms)
        return out

    @contextmanager
    def patched(self) -> Iterator[None]:
        before = [norm.__dict__.get("forward") for norm in self.norms]  # fastconv's bf16 forward, if any
        for i, norm in enumerate(self.norms):
            norm.forward = (lambda i, norm: lambda x: self._forward(i, norm, x))(i, norm)
        try:
            yield
        finally:
            for norm, forward in zip(self.norms, before):
                del norm.forward  # back to the class's GroupNorm.forward ...
                if forward is not None:
                    norm.forward = forward  # ... or to what it ran before


def _boxes(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


def _run_tiles(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out: torch.Tensor, tile: int, halo: int, factor: float, grid: int
) -> None:
    """``out = net(x)`` tile by tile: ``x`` (1, C, H, W), ``out`` (1, C', H*factor, W*factor).

    ``tile``/``halo`` in elements of ``x``; ``grid``: tile corners stay on multiples of it, so strided
    layers sample the same positions as on the whole input.
    """
    h, w = x.shape[-2:]
    o = lambda v: round(v * factor)  # noqa: E731
    for r0, r1 in _boxes(h, tile):
        for c0, c1 in _boxes(w, tile):
            a0, a1 = max(r0 - halo, 0) // grid * grid, min(r1 + halo, h)
            b0, b1 = max(c0 - halo, 0) // grid * grid, min(c1 + halo, w)
            y = net(x[..., a0:a1, b0:b1])
            out[..., o(r0) : o(r1), o(c0) : o(c1)] = y[..., o(r0 - a0) : o(r1 - a0), o(c0 - b0) : o(c1 - b0)]


def _spans(n: int, crop: int, count: int, grid: int) -> list[tuple[int, int]]:
    """``count`` windows of ``crop`` elements spread evenly over [0, n), starts on multiples of ``grid``."""
    if n <= crop * count:
        return [(0, n)]
    starts = [(i * (n - crop) // (count - 1) if count > 1 else (n - crop) // 2) // grid * grid for i in range(count)]
    return [(a, a + crop) for a in starts]


def mosaic(x: torch.Tensor, preview: int, grid: int) -> torch.Tensor:
    """A full-resolution preview of ``x`` (1, C, H, W): PREVIEW_CROPS x PREVIEW_CROPS crops of
    ``preview / PREVIEW_CROPS`` elements spread evenly over the image, stitched; ``x`` itself if it is small.

    Crops at full resolution keep the scale of the content, so their GroupNorm statistics estimate the
    whole image's (a stratified spatial sample). An area-downsampled preview measured about the same
    (1024 px decode vs untiled: 32.3 vs 32.4 dB on the shipped model; docs/benchmarks.md).
    """
    crop = max(grid, preview // PREVIEW_CROPS // grid * grid)
    rows = _spans(x.shape[-2], crop, PREVIEW_CROPS, grid)
    cols = _spans(x.shape[-1], crop, PREVIEW_CROPS, grid)
    return torch.cat([torch.cat([x[..., a:b, c:d] for c, d in cols], -1) for a, b in rows], -2)


def _approx(
    net: Callable[[torch.Tensor], torch.Tensor],
    norms: _Norms,
    x: torch.Tensor,
    out: torch.Tensor,
    factor: float,
    tile: int,
    halo: int,
    preview: int,
    grid: int,
) -> None:
    """``out = net(x)`` for a batch, image by image: statistics from its mosaic preview, then its tiles."""
    with norms.patched():
        for i in range(x.shape[0]):
            norms.fixed = None
            net(mosaic(x[i : i + 1], preview, grid))
            norms.fixed = norms.take()
            _run_tiles(net, x[i : i + 1], out[i : i + 1], tile, halo, factor, grid)


def _check(tile_size: int | None, halo: int, preview: int, f: int) -> int:
    tile = _check_tile(tile_size or DEFAULT_TILE, f)
    if halo < 0 or halo % f or preview < f * PREVIEW_CROPS or preview % f:
        raise InputError(f"tiling='approx': halo={halo} and preview={preview} must be multiples of {f} "
                         f"(halo >= 0, preview >= {f * PREVIEW_CROPS})")
    return tile


@torch.no_grad()
def approx_encode_moments(
    vae: nn.Module,
    x: torch.Tensor,
    tile_size: int | None = None,
    *,
    halo: int = DEFAULT_HALO,
    preview: int = DEFAULT_PREVIEW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate low-memory ``vae.encode``: images (B, 3, H, W) in [-1, 1], H and W multiples of 8 ->
    raw posterior (mean, logvar) (B, C, H/8, W/8) float32, logvar clamped to [-30, 20] as diffusers.

    ``tile_size``, ``halo``, ``preview`` in image pixels; see the module docstring for what is approximate.
    """
    f = downsample_factor(vae)
    tile = _check(tile_size, halo, preview, f)

    def net(t: torch.Tensor) -> torch.Tensor:
        return encoder_moments(vae, t)

    out = x.new_empty(x.shape[0], 2 * vae.config.latent_channels, x.shape[-2] // f, x.shape[-1] // f)
    _approx(net, _Norms(vae.encoder), x, out, 1 / f, tile, halo, preview, f)
    return split_moments(out.float())  # (B, C, h, w) each


@torch.no_grad()
def approx_decode(
    vae: nn.Module,
    z: torch.Tensor,
    tile_size: int | None = None,
    *,
    halo: int = DEFAULT_HALO,
    preview: int = DEFAULT_PREVIEW,
) -> torch.Tensor:
    """Approximate low-memory ``vae.decode``: raw latents (B, C, h, w) -> images (B, 3, 8h, 8w), model dtype.

    ``tile_size``, ``halo``, ``preview`` in image pixels; see the module docstring for what is approximate.
    """
    f = downsample_factor(vae)
    tile = _check(tile_size, halo, preview, f)

    def net(t: torch.Tensor) -> torch.Tensor:
        return decode_raw(vae, t)

    out = z.new_empty(z.shape[0], vae.config.out_channels, z.shape[-2] * f, z.shape[-1] * f)
    _approx(net, _Norms(vae.decoder), z, out, f, tile // f, halo // f, preview // f, 1)
    return out
