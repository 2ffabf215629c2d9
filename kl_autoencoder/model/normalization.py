"""Latent normalisation: raw VAE latents ``z`` <-> what a diffusion model sees, for every KL-VAE family.

One function pair, ``normalize_latents`` / ``denormalize_latents``, used everywhere (encode, decode, the
latent cache and ``LatentDataset``, stats, swap, interpolate, score). The rule is read from the VAE
itself (its config, or FLUX.2's BatchNorm buffers) into a ``LatentNormalization``, which a latent cache
stores in its manifest (``to_json``) so the dataset applies the same rule without the model. Three kinds:

* ``scalar`` (SD 1.x/2.x, SDXL, SD3, FLUX.1): ``latents = (z - shift_factor) * scaling_factor``, shift 0
  when the config has none; diffusers pipeline_stable_diffusion_3.py decodes ``latents / scaling_factor
  + shift_factor``.
* ``per-channel`` (Playground v2.5: config ``latents_mean`` and ``latents_std``, 4 values each):
  ``latents = (z - latents_mean) * scaling_factor / latents_std`` per channel, as diffusers 0.42's
  pipeline_stable_diffusion_xl_img2img.py encodes (``prepare_latents``, l. 696-700 and 746-749) and
  pipeline_stable_diffusion_xl.py decodes (``__call__``, l. 1276-1285: ``latents * latents_std /
  scaling_factor + latents_mean``); shift_factor plays no part there.
* ``batchnorm`` (FLUX.2, ``diffusers.AutoencoderKLFlux2``): z (B, C, h, w) is cut into 2x2 patches,
  (B, 4C, h/2, w/2), then normalised by the VAE's BatchNorm running statistics
  ``(p - running_mean) / sqrt(running_var + batch_norm_eps)`` (diffusers pipelines/flux2/pipeline_flux2.py
  ``_patchify_latents`` and ``_encode_vae_image``; decoding inverts it, then ``_unpatchify_latents``).
  Normalised FLUX.2 latents have 4C = 128 channels at 1/16 of the image size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .layout import latent_patch

KINDS = ("scalar", "per-channel", "batchnorm")
Floats = tuple[float, ...]


def patchify(z: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*ph*pw, h/ph, w/pw); channel c*ph*pw + i*pw + j holds pixel (i, j) of each patch."""
    b, c, h, w = z.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise InputError(f"latents of size {h}x{w} cannot be cut into {ph}x{pw} patches (FLUX.2): height and width "
                         f"must be multiples of {ph}x{pw}, i.e. images multiples of {8 * ph} pixels")
    z = z.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4)  # (B, C, ph, pw, h/ph, w/pw)
    return z.reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchify(p: torch.Tensor, patch: tuple[int, int] = (2, 2)) -> torch.Tensor:
    """The inverse of ``patchify``: (B, C*ph*pw, H, W) -> (B, C, H*ph, W*pw)."""
    b, cp, h, w = p.shape
    ph, pw = patch
    p = p.reshape(b, cp // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, H, ph, W, pw)
    return p.reshape(b, cp // (ph * pw), h * ph, w * pw)


def _floats(values: Any, name: str) -> Floats | None:
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a list of numbers, got {values!r}") from None


def _column(values: Floats, like: torch.Tensor) -> torch.Tensor:
    """Per-channel values as (1, C, 1, 1) float32 (as diffusers builds them from config lists), then ``like``'s dtype."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(like.device, like.dtype)


def _bn_std(var: Floats, eps: float, like: torch.Tensor) -> torch.Tensor:
    """sqrt(running_var + eps), (1, C, 1, 1): computed in float32 (the buffer's dtype), then cast, as pipeline_flux2.py."""
    return torch.sqrt(torch.tensor(var, dtype=torch.float32).view(1, -1, 1, 1) + eps).to(like.device, like.dtype)


@dataclass(frozen=True)
class LatentNormalization:
    """How raw latents become normalised ones (see the module doc for the three kinds).

    ``scaling_factor``/``shift_factor``: the scalar kind (and ``scaling_factor`` for per-channel);
    ``mean``/``std``: per-channel ``latents_mean``/``latents_std``; ``mean``/``var``/``eps``/``patch_size``:
    FLUX.2's BatchNorm ``running_mean``/``running_var`` (4C values each), ``batch_norm_eps`` and patch.
    """

    kind: str = "scalar"
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    mean: Floats | None = None
    std: Floats | None = None
    var: Floats | None = None
    eps: float = 0.0
    patch_size: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"latent normalisation kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.kind != "batchnorm" and not self.scaling_factor > 0:
            raise InputError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if self.kind == "per-channel" and (not self.mean or not self.std or len(self.mean) != len(self.std)):
            raise InputError("per-channel normalisation needs latents_mean and latents_std of one length each")
        if self.kind == "per-channel" and min(self.std) <= 0:
            raise InputError(f"latents_std must be > 0, got {list(self.std)}")
        if self.kind == "batchnorm" and (not self.mean or not self.var or len(self.mean) != len(self.var)):
            raise InputError("BatchNorm normalisation needs running_mean and running_var of one length each")

    @property
    def patch(self) -> tuple[int, int]:
        return tuple(self.patch_size) if self.kind == "batchnorm" else (1, 1)

    def channels(self, latent_channels: int) -> int:
        """Channels of normalised latents for a VAE with ``latent_channels`` raw ones."""
        return latent_channels * self.patch[0] * self.patch[1]

    def _check_channels(self, t: torch.Tensor, n: int | None, what: str) -> None:
        if t.ndim != 4:
            raise InputError(f"{what}: expected (B, C, h, w), got shape {tuple(t.shape)}")
        if n is not None and t.shape[1] != n:
            raise InputError(f"{what}: {t.shape[1]} channels, this normalisation ({self.describe()}) has {n}")

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, h, w) -> normalised (B, C, h, w), or (B, 4C, h/2, w/2) for FLUX.2."""
        if self.kind == "scalar":
            return (z - (self.shift_factor or 0.0)) * self.scaling_factor
        if self.kind == "per-channel":  # pipeline_stable_diffusion_xl_img2img.py l. 749
            self._check_channels(z, len(self.mean), "raw latents")
            return (z - _column(self.mean, z)) * self.scaling_factor / _column(self.std, z)
        p = patchify(z, self.patch)  # (B, 4C, h/2, w/2)
        self._check_channels(p, len(self.mean), "patchified latents")
        return (p - _column(self.mean, p)) / _bn_std(self.var, self.eps, p)  # pipeline_flux2.py l. 613-617

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``normalize``: normalised latents -> raw (B, C, h, w)."""
        if self.kind == "scalar":
            return latents / self.scaling_factor + (self.shift_factor or 0.0)
        if self.kind == "per-channel":  # pipeline_stable_diffusion_xl.py l. 1285
            self._check_channels(latents, len(self.mean), "latents")
            return latents * _column(self.std, latents) / self.scaling_factor + _column(self.mean, latents)
        self._check_channels(latents, len(self.mean), "latents")
        raw = latents * _bn_std(self.var, self.eps, latents) + _column(self.mean, latents)  # pipeline_flux2.py l. 1019-1024
        return unpatchify(raw, self.patch)

    def describe(self) -> str:
        """One line for messages and reports, e.g. ``(z - 0.1159) * 0.3611``."""
        if self.kind == "scalar":
            return f"(z - {self.shift_factor or 0.0}) * {self.scaling_factor}"
        if self.kind == "per-channel":
            return f"(z - latents_mean) * {self.scaling_factor} / latents_std, per channel ({len(self.mean)})"
        ph, pw = self.patch
        return f"{ph}x{pw} patches, (p - running_mean) / sqrt(running_var + {self.eps}), {len(self.mean)} channels"

    def to_json(self) -> dict[str, Any]:
        """Plain values, with diffusers' config names (``latents_mean``, ``running_var``, ...)."""
        if self.kind == "scalar":
            return {"kind": "scalar", "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        if self.kind == "per-channel":
            return {"kind": "per-channel", "scaling_factor": self.scaling_factor,
                    "latents_mean": list(self.mean), "latents_std": list(self.std)}
        return {"kind": "batchnorm", "running_mean": list(self.mean), "running_var": list(self.var),
                "batch_norm_eps": self.eps, "patch_size": list(self.patch_size)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LatentNormalization":
        kind = d.get("kind", "scalar")
        if kind == "batchnorm":
            return cls("batchnorm", mean=_floats(d.get("running_mean"), "running_mean"),
                       var=_floats(d.get("running_var"), "running_var"), eps=float(d.get("batch_norm_eps", 0.0)),
                       patch_size=tuple(int(v) for v in d.get("patch_size", (2, 2))))
        shift = d.get("shift_factor")
        return cls(kind, scaling_factor=float(d.get("scaling_factor", 1.0)), shift_factor=None if shift is None else float(shift),
                   mean=_floats(d.get("latents_mean"), "latents_mean"), std=_floats(d.get("latents_std"), "latents_std"))

    def with_factors(self, scaling_factor: float | None = None, shift_factor: float | None = None) -> "LatentNormalization":
        """This rule with ``scaling_factor``/``shift_factor`` replaced (None keeps them); not for FLUX.2's BatchNorm."""
        if scaling_factor is None and shift_factor is None:
            return self
        if self.kind == "batchnorm":
            raise InputError("FLUX.2 latents are normalised by the VAE's BatchNorm statistics; "
                             "scaling_factor/shift_factor do not apply (measure new statistics with `kl-autoencoder stats`)")
        if shift_factor is not None and self.kind == "per-channel":
            raise InputError("per-channel normalisation (latents_mean/latents_std) has no shift_factor")
        changes = {k: float(v) for k, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)) if v is not None}
        return dataclasses.replace(self, **changes)


def latent_normalization(vae: nn.Module | Any) -> LatentNormalization:
    """The rule of a VAE (or a ``LatentNormalization``, returned as it is), read from its config and buffers."""
    if isinstance(vae, LatentNormalization):
        return vae
    c = vae.config
    patch = latent_patch(c)
    bn = getattr(vae, "bn", None)
    if patch != (1, 1) and isinstance(bn, nn.BatchNorm2d):  # AutoencoderKLFlux2
        return LatentNormalization("batchnorm", mean=tuple(bn.running_mean.float().tolist()),
                                   var=tuple(bn.running_var.float().tolist()), eps=float(c.batch_norm_eps), patch_size=patch)
    mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
    if mean is not None and std is not None:  # diffusers applies them only when both are set
        return LatentNormalization("per-channel", scaling_factor=float(c.scaling_factor),
                                   mean=_floats(mean, "latents_mean"), std=_floats(std, "latents_std"))
    shift = getattr(c, "shift_factor", None)
    return LatentNormalization("scalar", scaling_factor=float(c.scaling_factor), shift_factor=None if shift is None else float(shift))


def normalization_from_manifest(manifest: dict[str, Any], *, scaling_factor: float | None = None,
                                shift_factor: float | None = None) -> LatentNormalization:
    """The rule a latent cache's manifest records (``latent_normalization``; older caches only have the
    scalar ``scaling_factor``/``shift_factor``), with the factors optionally replaced."""
    d = manifest.get("latent_normalization")
    if d is None:
        d = {"kind": "scalar", "scaling_factor": manifest["scaling_factor"], "shift_factor": manifest.get("shift_factor")}
    return LatentNormalization.from_json(d).with_factors(scaling_factor, shift_factor)


def normalize_latents(vae: nn.Module | LatentNormalization, z: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> normalised, by the VAE's rule (or a ``LatentNormalization``)."""
    return latent_normalization(vae).normalize(z)


def denormalize_latents(vae: nn.Module | LatentNormalization, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> raw (B, C, h, w): the inverse of ``normalize_latents``."""
    return latent_normalization(vae).denormalize(latents)
