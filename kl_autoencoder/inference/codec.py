"""Encode, decode, reconstruct: images <-> normalised latents, with padding, memory planning and tiling.

Latent convention: a VAE's raw latent ``z`` is normalised by the VAE's own rule (``model/normalization.py``:
``(z - shift_factor) * scaling_factor``, Playground's per-channel mean/std, FLUX.2's BatchNorm over 2x2
patches) so a diffusion model sees unit-variance latents; ``decode`` inverts it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, InputTypeError
from ..model import decode_raw, denormalize_latents, encoder_moments, normalize_latents, normalized_channels, posterior, size_multiple
from ..utils.devices import has_data, randn
from ..utils.images import as_image_batch
from .malloc import reuse_freed_memory
from .memory_plan import reuse_fits, tiling_plan

TILING_MODES = ("auto", "always", "never", "approx")
log = logging.getLogger("kl_autoencoder")


def _param(vae: nn.Module) -> torch.Tensor:
    return next(vae.parameters())


def _check_tiling(tiling: str) -> None:
    if tiling not in TILING_MODES:
        raise InputError(f"tiling={tiling!r}: choose one of {', '.join(TILING_MODES)}")


def _prepare(vae: nn.Module, images: Any, pad: str | None) -> tuple[torch.Tensor, tuple[int, int]]:
    x = as_image_batch(images)  # (B, 3, H, W) in [-1, 1]
    if x.shape[1] != vae.config.in_channels:
        raise InputError(f"images have {x.shape[1]} channels, the VAE expects {vae.config.in_channels}")
    h, w = x.shape[-2:]
    f = size_multiple(vae)  # 8; 16 for FLUX.2, whose latents are cut into 2x2 patches
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        if pad is None:
            raise InputError(f"image size {w}x{h} is not a multiple of {f}; crop it, or pass pad='reflect'")
        mode = "reflect" if pad == "reflect" and ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)  # (B, 3, H', W'), multiples of f; reconstruct() crops back
    p = _param(vae)
    return x.to(device=p.device, dtype=p.dtype), (h, w)


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    """An int seed becomes a CPU generator: the noise is drawn on the CPU and moved (``utils/devices.py``),
    so a seed gives the same sample on every device; a caller's generator is used on its own device."""
    if generator is None:
        raise InputError("sample=True needs generator=torch.Generator or an integer seed, so results are reproducible")
    if isinstance(generator, int):
        return torch.Generator(device="cpu").manual_seed(generator)
    return generator


_upcast_lock = threading.Lock()


@contextlib.contextmanager
def upcast_if_asked(vae: nn.Module) -> Iterator[None]:
    """Run an fp16 VAE whose config says ``force_upcast`` in fp32 inside the block, as diffusers does.

    diffusers StableDiffusionXLPipeline.__call__: ``needs_upcasting = self.vae.dtype == torch.float16 and
    self.vae.config.force_upcast`` then ``self.upcast_vae()`` (the VAE cast to fp32 in place) and back to fp16
    after decoding; ``prepare_latents`` of the img2img pipeline does the same around ``encode``. bf16 is never
    upcast (its range is fp32's). fp16 -> fp32 -> fp16 is exact, so the weights come back unchanged.
    Calls from several threads on one model share the upcast: the first casts up, the last one out casts back
    (a count on the model), so no call has its weights cast back to fp16 under it.
    """
    with _upcast_lock:
        inside = vae.__dict__.get("_kl_upcast_calls", 0)
        if not inside and (_param(vae).dtype != torch.float16 or not getattr(vae.config, "force_upcast", False)):
            active = False
        else:
            active = True
            if not inside:
                log.debug("fp16 VAE with force_upcast: running it in fp32")
                vae.to(torch.float32)
            vae.__dict__["_kl_upcast_calls"] = inside + 1
    if not active:
        yield
        return
    try:
        yield
    finally:
        with _upcast_lock:
            vae.__dict__["_kl_upcast_calls"] -= 1
            if not vae.__dict__["_kl_upcast_calls"]:
                vae.to(torch.float16)


def _warn_approx(tiling: str, shape: torch.Size) -> None:
    if tiling == "auto":  # asked for approx explicitly: no warning
        warnings.warn(f"{tuple(shape)}: even exact tiling would not fit in memory; using tiling='approx' "
                      "(approximate GroupNorm statistics, see docs/benchmarks.md)", stacklevel=3)


@torch.no_grad()
def encode_moments(
    vae: nn.Module,
    images: Any,
    *,
    pad: str | None = "reflect",
    tiling: str = "auto",
    tile_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance, both raw (unnormalised), (B, C, ceil(H/8), ceil(W/8)), float32.

    ``tiling``: "never" runs the plain encoder; "always" / "auto" (large images) run the exact tiled
    encoder of ``tiling.py`` with ``tile_size`` image pixels per tile; "approx" the approximate
    low-memory one of ``tiling_approx.py`` (memory independent of the image size, not exact).
    """
    _check_tiling(tiling)
    with upcast_if_asked(vae):
        x, _ = _prepare(vae, images, pad)
        plan = tiling_plan(vae, tuple(x.shape), "encode", tiling)
        if plan == "approx":
            from .tiling_approx import approx_encode_moments

            _warn_approx(tiling, x.shape)
            return approx_encode_moments(vae, x, tile_size)
        if plan == "tiles":
            from .tiling import tiled_encode_moments

            return tiled_encode_moments(vae, x, tile_size)
        with reuse_freed_memory(enabled=reuse_fits(vae, tuple(x.shape), "encode", plan)):  # malloc.py
            if plan == "slices":
                moments = torch.cat([encoder_moments(vae, t) for t in x.split(1)])  # (B, 2C, h, w)
            else:
                moments = encoder_moments(vae, x)
    return posterior.split_moments(moments.float())


def encode(
    vae: nn.Module,
    images: Any,
    *,
    sample: bool = False,
    generator: torch.Generator | int | None = None,
    pad: str | None = "reflect",
    tiling: str = "auto",
    tile_size: int | None = None,
) -> torch.Tensor:
    """Images -> normalised latents ``(z - shift) * scale`` (or the VAE's rule), (B, C, ceil(H/8), ceil(W/8)),
    float32; FLUX.2: (B, 4C, ceil(H/16), ceil(W/16)).

    ``images``: float tensor in [-1, 1] (B,3,H,W) or (3,H,W), uint8 arrays/tensors (…,H,W,3), PIL images.
    ``z`` is the posterior mean unless ``sample=True``, which draws from the posterior with ``generator``
    (a torch.Generator or an int seed; required). Sizes that are not multiples of 8 are padded on the
    bottom/right (``pad="reflect"``; ``pad=None`` raises instead); ``reconstruct`` crops back.
    """
    mean, logvar = encode_moments(vae, images, pad=pad, tiling=tiling, tile_size=tile_size)
    z = mean
    if sample:
        z = posterior.sample(mean, logvar, randn(tuple(mean.shape), _generator(generator), mean.device))
    return normalize_latents(vae, z)


def check_latents(vae: nn.Module, latents: Any, name: str = "latents", *, raw: bool = False) -> torch.Tensor:
    """Validate a latent tensor: float, (B, C, h, w) or (C, h, w), all finite; C = the channels of normalised
    latents (4 x latent_channels for FLUX.2's 2x2 patches), or of raw ones with ``raw=True``."""
    if not isinstance(latents, torch.Tensor):
        raise InputTypeError(f"{name}: expected a torch.Tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise InputTypeError(f"{name}: expected a float tensor, got {latents.dtype}")
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4:
        raise InputError(f"{name}: expected shape (B, C, h, w), got {tuple(latents.shape)}")
    if latents.numel() == 0:
        raise InputError(f"{name}: shape {tuple(latents.shape)} has a dimension of size 0; nothing to decode")
    c = vae.config.latent_channels if raw else normalized_channels(vae)
    if latents.shape[1] != c:
        kind = " raw" if raw else ""
        raise InputError(f"{name}: has {latents.shape[1]} channels, this VAE's{kind} latents have {c}")
    if has_data(latents) and not torch.isfinite(latents).all():
        n = int((~torch.isfinite(latents)).sum())
        raise InputError(f"{name}: {n} non-finite values (NaN/inf)")
    return latents


@torch.no_grad()
def decode(vae: nn.Module, latents: torch.Tensor, *, tiling: str = "auto", tile_size: int | None = None) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w) (FLUX.2: (B, 4C, h, w) -> 16h x 16w), float32,
    nominally in [-1, 1].

    The output is not clamped, so it equals diffusers' ``vae.decode(latents / scale + shift)``;
    ``to_pil``/``to_uint8`` clamp. An fp16 VAE whose config says ``force_upcast`` decodes in fp32
    (``upcast_if_asked``); a half-precision VAE whose output is still not finite (fp16 overflow, the
    SDXL-VAE black image) is re-run in fp32 with a warning.
    """
    _check_tiling(tiling)
    latents = check_latents(vae, latents)
    with upcast_if_asked(vae):
        p = _param(vae)
        z = denormalize_latents(vae, latents.to(device=p.device, dtype=torch.float32))  # (B, C, h, w) raw
        plan = tiling_plan(vae, tuple(z.shape), "decode", tiling)
        run = _decoder(plan, tile_size)
        if plan == "approx":
            _warn_approx(tiling, z.shape)
        with reuse_freed_memory(enabled=reuse_fits(vae, tuple(z.shape), "decode", plan)):  # malloc.py; off when tiled
            out = run(vae, z.to(p.dtype))
            if p.dtype in (torch.float16, torch.bfloat16) and has_data(out) and not torch.isfinite(out).all():
                warnings.warn(f"{p.dtype} decode overflowed (non-finite output); decoding again in fp32", stacklevel=2)
                out = run(copy.deepcopy(vae).float(), z)
    return out.float()


def _decoder(plan: str, tile_size: int | None):
    """The decode function of a plan: (vae, raw latents) -> images."""
    if plan == "approx":
        from .tiling_approx import approx_decode

        return lambda m, t: approx_decode(m, t, tile_size)
    if plan == "tiles":
        from .tiling import tiled_decode

        return lambda m, t: tiled_decode(m, t, tile_size)
    if plan == "slices":
        return lambda m, t: torch.cat([decode_raw(m, s) for s in t.split(1)])
    return decode_raw


def reconstruct(
    vae: nn.Module,
    images: Any,
    *,
    sample: bool = False,
    generator: torch.Generator | int | None = None,
    tiling: str = "auto",
    tile_size: int | None = None,
) -> torch.Tensor:
    """Encode then decode; output cropped back to the input size, float32 in [-1, 1] (clamped)."""
    x = as_image_batch(images)
    h, w = x.shape[-2:]
    z = encode(vae, x, sample=sample, generator=generator, tiling=tiling, tile_size=tile_size)
    out = decode(vae, z, tiling=tiling, tile_size=tile_size)
    return out[..., :h, :w].clamp(-1, 1)
