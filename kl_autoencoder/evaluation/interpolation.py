"""Latent interpolation: encode two images, walk between their latents, decode every step into one strip.

``interpolate(vae, a, b, steps)`` (CLI: ``kl-autoencoder interpolate MODEL A B --steps N --out strip.png``)
encodes A and B to normalised latents (posterior means, ``inference.encode``), interpolates them and decodes
each step; step 0 and step N-1 are exactly the plain reconstructions ``inference.reconstruct(vae, A / B)``.

Sizes: with ``size=S`` both images are resized (short side -> S, antialiased bicubic) and centre-cropped
to S x S. Without it, images of one size are used as they are; otherwise B is resized to cover A's size
and centre-cropped to it (A is never changed). Sizes that are not multiples of 8 are padded for the VAE
and cropped back, as ``inference.reconstruct`` does.

Spherical interpolation (the default): a high-dimensional Gaussian latent lives near a sphere of radius
sqrt(dim); the straight line between two such latents passes well inside it (the midpoint of two
independent ones has ~0.707x their norm), where the decoder has seen no data. ``slerp`` walks the great
circle between the two directions (Shoemake 1985; White, "Sampling generative networks", 2016) while
the norm moves linearly between the two end norms, so it never leaves the band the ends span.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..inference import decode, encode
from ..utils.images import (
    as_image_batch,
    center_box,
    load_image,
    pil_to_tensor,
    save_grid,
    tensor_to_pil,
)

log = logging.getLogger("kl_autoencoder")
MODES = ("slerp", "lerp")


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Straight-line interpolation ``(1 - t) a + t b``; t=0 gives ``a``, t=1 gives ``b`` exactly."""
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    return (1.0 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of (B, ...) tensors, each sample's values taken as one flattened vector.

    Direction: the great-circle arc between a/|a| and b/|b|; norm: (1 - t)|a| + t|b|, so every step's
    norm lies between the end norms (for |a| = |b| this is Shoemake's slerp exactly). Where the two
    vectors are (anti)parallel (sin of the angle < ``eps``) or one is zero, the arc is undefined and
    the sample falls back to ``lerp``. t=0 gives ``a`` and t=1 gives ``b`` exactly. Computed in float64.
    """
    if a.shape != b.shape:
        raise InputError(f"slerp: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 2:
        raise InputError(f"slerp: expected (B, ...) tensors with a batch dimension, got shape {tuple(a.shape)}")
    t = float(t)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    fa, fb = a.flatten(1).double(), b.flatten(1).double()  # (B, D)
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)  # (B, 1)
    ua, ub = fa / na.clamp_min(1e-300), fb / nb.clamp_min(1e-300)
    # the angle as 2 atan2(|ua - ub|, |ua + ub|): accurate near 0 and pi, where acos(ua . ub) is not (Kahan)
    omega = 2.0 * torch.atan2((ua - ub).norm(dim=1, keepdim=True), (ua + ub).norm(dim=1, keepdim=True))  # (B, 1)
    so = torch.sin(omega)
    direction = (torch.sin((1.0 - t) * omega) * ua + torch.sin(t * omega) * ub) / so.clamp_min(eps)  # unit (B, D)
    out = ((1.0 - t) * na + t * nb) * direction
    degenerate = (so < eps) | (na == 0) | (nb == 0)  # (B, 1)
    out = torch.where(degenerate, (1.0 - t) * fa + t * fb, out)
    return out.reshape(a.shape).to(a.dtype)


def as_one_image(x: Any, name: str) -> torch.Tensor:
    """A path, PIL image, array or tensor -> (1, 3, H, W) float32 in [-1, 1]."""
    if isinstance(x, (str, Path)):
        x = pil_to_tensor(load_image(x))
    t = as_image_batch(x)
    if t.shape[0] != 1:
        raise InputError(f"{name}: expected one image, got a batch of {t.shape[0]}")
    return t.float()


def _cover_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (antialiased bicubic) so (height, width) fits inside, then centre-crop to it. (1,3,h,w)->(1,3,H,W)."""
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    left, top, right, bottom = center_box(nw, nh, width, height)
    return x[..., top:bottom, left:right]


def match_sizes(xa: torch.Tensor, xb: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Bring two (1, 3, H, W) images to one size; returns both and a sentence saying what was done."""
    (ha, wa), (hb, wb) = xa.shape[-2:], xb.shape[-2:]
    if size is not None:
        if size < 1:
            raise InputError(f"size must be a positive number of pixels, got {size}")
        note = f"both images resized (short side {size}) and centre-cropped to {size}x{size}"
        return _cover_crop(xa, size, size), _cover_crop(xb, size, size), note
    if (ha, wa) == (hb, wb):
        return xa, xb, f"both images are {wa}x{ha}: used as they are"
    return xa, _cover_crop(xb, ha, wa), f"B ({wb}x{hb}) resized and centre-cropped to A's size {wa}x{ha}"


@torch.no_grad()
def interpolate(
    vae: torch.nn.Module,
    a: Any,
    b: Any,
    steps: int,
    mode: str = "slerp",
    *,
    size: int | None = None,
    tiling: str = "auto",
    tile_size: int | None = None,
) -> torch.Tensor:
    """Decode ``steps`` points on the path between the normalised latents of images ``a`` and ``b``.

    ``a``, ``b``: image paths, PIL images, uint8 arrays or float tensors in [-1, 1] (one image each).
    Sizes: see the module docstring (``size=S``: both to S x S; else B resized/cropped to A's size).
    ``mode``: "slerp" (default) or "lerp". ``steps`` >= 2; both ends are included, at t = i / (steps - 1).
    Returns images (steps, 3, H, W), float32 in [-1, 1] (clamped); row 0 and row -1 equal
    ``inference.reconstruct`` of the (size-matched) A and B.
    """
    if int(steps) != steps or steps < 2:
        raise InputError(f"steps must be an integer >= 2 (both ends are included), got {steps}")
    if mode not in MODES:
        raise InputError(f"mode {mode!r}: choose slerp or lerp")
    xa, xb, note = match_sizes(as_one_image(a, "A"), as_one_image(b, "B"), size)
    log.info("interpolate: %s", note)
    h, w = xa.shape[-2:]
    kw = {"tiling": tiling, "tile_size": tile_size}
    za, zb = encode(vae, xa, **kw), encode(vae, xb, **kw)  # (1, C, h/8, w/8) normalised, posterior means
    walk = slerp if mode == "slerp" else lerp
    frames = []
    for i in range(int(steps)):
        z = walk(za, zb, i / (steps - 1))  # (1, C, h/8, w/8)
        frames.append(decode(vae, z, **kw)[..., :h, :w].clamp(-1, 1))  # one at a time: bounded memory
    return torch.cat(frames)  # (steps, 3, H, W)


def save_strip(images: torch.Tensor, path: str | Path, pad: int = 4) -> Path:
    """Write images (N, 3, H, W) in [-1, 1] side by side, ``pad`` white pixels apart, as one image file."""
    return save_grid([tensor_to_pil(images)], path, pad=pad)
