"""Single weights files (.safetensors/.ckpt/.pt/.bin/.pth) in diffusers or LDM layout -> AutoencoderKL, strictly.

The architecture comes from tensor shapes, never from the network; every key must be mapped
(``ldm_keys``) and every shape must match, or the error lists the unmapped, missing and misshapen keys.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from torch import nn

from ..model import VAE_CLASSES, check_family, get_family

from .ldm_keys import (
    TRAINING_ONLY_PREFIXES,
    ConversionError,
    examples,
    is_attention_weight,
    ldm_key,
    num_levels,
    strip_prefix,
    to_ldm_keys,
    vae_keys,
)
from .weight_files import read_weights

log = logging.getLogger("kl_autoencoder")

SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x VAE (CompVis configs/stable-diffusion/v1-inference.yaml)
# Config fields kept in LDM safetensors metadata, since shapes cannot tell them (GroupNorm groups, activation)
META_FIELDS = ("scaling_factor", "shift_factor", "norm_num_groups", "act_fn", "sample_size", "force_upcast")
# ... and these when the config sets them (per-channel normalisation; FLUX.2's BatchNorm and patches)
EXTRA_META_FIELDS = ("latents_mean", "latents_std", "batch_norm_eps", "batch_norm_momentum", "patch_size")
META_KEY = "kl_autoencoder.config"
FLUX2_BN = "bn.running_mean"  # AutoencoderKLFlux2's latent BatchNorm: its presence makes a FLUX.2 VAE


def init_fields(cls: type) -> set[str]:
    """Constructor arguments of a diffusers VAE class (config fields it accepts)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"}



def _first_shape(sd: dict[str, torch.Tensor], pattern: str) -> torch.Size | None:
    for k in sorted(sd):
        if re.fullmatch(pattern, k):
            return sd[k].shape
    return None


def infer_groups(channels: list[int]) -> int:
    """GroupNorm groups are not visible in weight shapes. 32 (every SD/SDXL/SD3/FLUX VAE) when it divides
    every channel count; else the largest power of two that does (published configs use powers of two;
    the tests' micro models use 8). ``save_ldm`` stores the true value in metadata, which wins."""
    g = math.gcd(*channels)
    return max(d for d in (1, 2, 4, 8, 16, 32) if g % d == 0)


def infer_config(ldm: dict[str, torch.Tensor], where: str = "weights") -> dict[str, Any]:
    """AutoencoderKL constructor arguments from the shapes of an LDM-keyed state dict."""
    n = num_levels(list(ldm), r"encoder\.down\.(\d+)\.")
    if n == 0:
        raise ConversionError(f"{where}: no encoder.down.* / encoder.down_blocks.* weights: not an AutoencoderKL VAE checkpoint")
    channels = []
    for i in range(n):
        shape = _first_shape(ldm, rf"encoder\.down\.{i}\.block\.\d+\.conv2\.weight")
        if shape is None:
            raise ConversionError(f"{where}: missing key encoder.down.{i}.block.0.conv2.weight: cannot tell level {i}'s channels")
        channels.append(int(shape[0]))
    layers = num_levels(list(ldm), r"encoder\.down\.\d+\.block\.(\d+)\.")
    shapes = {k: ldm[k].shape for k in ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight") if k in ldm}
    missing = [k for k in ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight") if k not in shapes]
    if missing:
        raise ConversionError(f"{where}: missing key(s) {', '.join(missing)}: cannot tell the image/latent channels")
    return dict(
        in_channels=int(shapes["encoder.conv_in.weight"][1]),
        out_channels=int(shapes["decoder.conv_out.weight"][0]),
        latent_channels=int(shapes["encoder.conv_out.weight"][0]) // 2,  # encoder outputs mean and log-variance
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers,
        norm_num_groups=infer_groups(channels),
        use_quant_conv="quant_conv.weight" in ldm,
        use_post_quant_conv="post_quant_conv.weight" in ldm,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in ldm or "decoder.mid.attn_1.q.weight" in ldm,
    )


def _meta_config(meta: dict[str, str]) -> dict[str, Any]:
    """Config fields stored in safetensors metadata by ``save_ldm`` (or plain scaling_factor/shift_factor)."""
    out: dict[str, Any] = {}
    if META_KEY in meta:
        try:
            out.update({k: v for k, v in json.loads(meta[META_KEY]).items() if k in META_FIELDS + EXTRA_META_FIELDS})
        except (json.JSONDecodeError, AttributeError):
            log.warning("ignoring unreadable %s metadata", META_KEY)
    for k in ("scaling_factor", "shift_factor"):
        if k in meta and k not in out:
            try:
                out[k] = None if meta[k].lower() in ("", "none", "null") else float(meta[k])
            except ValueError:
                log.warning("ignoring unreadable %s metadata %r", k, meta[k])
    return out


def _sibling_config(path: Path) -> dict[str, Any]:
    """A diffusers weights file in its folder: take the non-shape fields from config.json beside it."""
    cfg = path.parent / "config.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    fields = META_FIELDS + EXTRA_META_FIELDS
    return {k: data[k] for k in fields if k in data} if data.get("_class_name") in VAE_CLASSES else {}


# ----------------------------------------------------------------------------- strict loading


def _fit(key: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``t`` shaped as ``shape``, or None if it cannot be (only attention 1x1 conv <-> Linear is allowed)."""
    if t.shape == shape:
        return t
    if is_attention_weight(key) and t.numel() == math.prod(shape) and t.shape[:2] == shape[:2]:
        return t.reshape(shape)  # (C, C, 1, 1) / (C, C, 1) <-> (C, C)
    return None


def _flux2_fields(ldm: dict[str, torch.Tensor], latent_channels: int, where: str) -> dict[str, Any]:
    """AutoencoderKLFlux2 fields from its BatchNorm: ``patch_size`` from running_mean's length (4C for 2x2 patches).

    ``bn.num_batches_tracked`` (a training counter that no computation reads) is filled in when a file lacks it.
    """
    n = ldm[FLUX2_BN].numel() // max(latent_channels, 1)
    p = math.isqrt(n)
    if p * p != n or ldm[FLUX2_BN].numel() != n * latent_channels:
        raise ConversionError(f"{where}: {FLUX2_BN} has {ldm[FLUX2_BN].numel()} values, not a square patch of "
                              f"{latent_channels} latent channels")
    ldm.setdefault("bn.num_batches_tracked", torch.tensor(0))
    return {"patch_size": (p, p), "batch_norm_eps": 1e-4}  # diffusers' default, FLUX.2's config


def _config(ldm: dict[str, torch.Tensor], known: dict[str, Any] | None, family: str | None, overrides: dict[str, Any],
            where: str) -> tuple[dict[str, Any], bool]:
    """(constructor arguments, whether the scaling factor was assumed): shapes, then ``known`` (metadata,
    config.json beside the file), then the family's table entry, then ``overrides``."""
    config = infer_config(ldm, where)
    flux2 = FLUX2_BN in ldm
    cls = AutoencoderKLFlux2 if flux2 else AutoencoderKL
    if flux2:
        config.update(_flux2_fields(ldm, config["latent_channels"], where))
    config.update({k: v for k, v in (known or {}).items() if k in META_FIELDS + EXTRA_META_FIELDS})
    if family is not None:
        fam = get_family(family)
        check_family(fam, cls.__name__, config["latent_channels"], where)
        config.update(fam.fields)
    config.update({k: v for k, v in overrides.items() if v is not None})
    config = {k: v for k, v in config.items() if k in init_fields(cls)}  # e.g. no scaling_factor for FLUX.2
    assumed = not flux2 and "scaling_factor" not in config
    if assumed:
        config["scaling_factor"] = SD_SCALING_FACTOR if config["latent_channels"] == 4 else 1.0
    return config, assumed


def check_values(sd: dict[str, torch.Tensor], template: dict[str, torch.Tensor], where: str, allow_nonfinite: bool = False) -> None:
    """Refuse tensors a VAE cannot hold as they are: an integer tensor where the model has a float parameter
    (a cast would turn weights like 0.02 into 0), and NaN/inf values unless ``allow_nonfinite``."""
    for k, t in sd.items():
        if template[k].is_floating_point() and not t.is_floating_point():
            raise ConversionError(f"{where}: {k} is {str(t.dtype).replace('torch.', '')}, not a float: a cast would change "
                                  "its values; is this file a quantised or corrupted checkpoint?")
        if t.is_floating_point() and not allow_nonfinite and t.numel() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise ConversionError(f"{where}: {k} holds {n} non-finite value(s) (NaN/inf); the file is broken "
                                  "(allow_nonfinite=True / --allow-nonfinite loads it anyway)")


def convert_state_dict(
    sd: dict[str, torch.Tensor], known: dict[str, Any] | None = None, *, where: str = "weights", family: str | None = None,
    allow_nonfinite: bool = False, **overrides: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any supported layout -> (diffusers state dict, AutoencoderKL or AutoencoderKLFlux2 config), strictly.

    ``known``: config fields shapes cannot tell (META_FIELDS), e.g. from metadata; ``family`` (``FAMILIES``:
    sd1, sdxl, flux1, ...) sets the published factors; ``overrides`` (e.g. scaling_factor=0.13025) beat
    both, and they beat defaults. A ``bn.running_mean`` key makes a FLUX.2 VAE (AutoencoderKLFlux2). Keys
    outside the VAE prefix of a full checkpoint are ignored. Raises ConversionError listing unmapped,
    missing and misshapen keys, and (``check_values``) integer or non-finite weights.
    """
    sd, prefix = strip_prefix({k: sd[k] for k in vae_keys(list(sd))})
    if prefix:
        log.info("%s: using the %d VAE weights under %r; other keys ignored", where, len(sd), prefix)
    training = [k for k in sd if k.startswith(TRAINING_ONLY_PREFIXES)]
    if training:
        log.info("%s: ignoring %d training-only keys (loss.*: LPIPS and discriminator)", where, len(training))
        sd = {k: v for k, v in sd.items() if k not in training}
    ldm, unmapped = to_ldm_keys(sd)
    config, assumed = _config(ldm, known, family, overrides, where)
    cls = vae_class_of(config)
    with torch.device("meta"):  # shapes only: no memory, no random init
        template = cls(**config).state_dict()
    n = len(config["block_out_channels"])
    expected = {ldm_key(k, n): k for k in template}
    if None in expected:  # pragma: no cover - a diffusers release with new parameter names
        raise ConversionError(f"{where}: this diffusers version has {cls.__name__} keys the converter does not know")
    unmapped += [k for k in ldm if k not in expected]
    missing = [k for k in expected if k not in ldm]
    out: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for lk, dk in expected.items():
        if lk in ldm:
            t = _fit(dk, ldm[lk], template[dk].shape)
            if t is None:
                bad_shapes.append(f"{lk} {tuple(ldm[lk].shape)} != {tuple(template[dk].shape)}")
            else:
                out[dk] = t
    if unmapped or missing or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {examples(missing)}")
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped key(s): {examples(unmapped)}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatch(es): {examples(bad_shapes, 3)}")
        raise ConversionError(
            f"{where}: not a complete {cls.__name__} ({config['block_out_channels']} channels, "
            f"{config['layers_per_block']} resnets/level) - " + "; ".join(parts)
            + ". Is it a full VAE in diffusers or LDM layout?"
        )
    check_values(out, template, where, allow_nonfinite)
    if assumed:
        log.warning(
            "%s: no scaling_factor stored; assuming %s. Give the family (--family / family=: sd1, sd2, sdxl, "
            "sdxl-fp16-fix, playground, sd3, flux1), pass scaling_factor=... or measure one with `kl-autoencoder stats`",
            where, config["scaling_factor"],
        )
    return out, config


def vae_class_of(config: dict[str, Any]) -> type:
    """AutoencoderKLFlux2 for a config with FLUX.2's latent patches, else AutoencoderKL."""
    return AutoencoderKLFlux2 if "patch_size" in config else AutoencoderKL


def build_vae(sd: dict[str, torch.Tensor], config: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The VAE (AutoencoderKL or AutoencoderKLFlux2) with exactly these weights (floats cast to ``dtype``);
    no random init is done."""
    with torch.device("meta"):
        vae = vae_class_of(config)(**config)
    vae.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=True, assign=True)
    return vae.eval()


def read_vae(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(fp32 VAE, info) from a weights file; info has the source ``dtype`` and ``layout``.

    ``overrides``: config fields (scaling_factor=...), or ``family=`` (see ``convert_state_dict``)."""
    path = Path(path)
    tensors, meta = read_weights(path, select=vae_keys)
    known = {**_sibling_config(path), **_meta_config(meta)}
    sd, config = convert_state_dict(tensors, known, where=str(path), **overrides)
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    src = dtypes.pop() if len(dtypes) == 1 else torch.float32
    layout = "ldm" if any(re.search(r"(^|\.)encoder\.down\.\d", k) for k in tensors) else "diffusers"
    return build_vae(sd, config), {"dtype": src, "layout": layout}


def load_file(path: str | Path, *, scaling_factor: float | None = None, shift_factor: float | None = None,
              family: str | None = None, allow_nonfinite: bool = False) -> nn.Module:
    """A single weights file (.safetensors/.ckpt/.pt/.bin/.pth) in diffusers or LDM layout -> fp32 VAE
    (AutoencoderKL; AutoencoderKLFlux2 when the file has FLUX.2's ``bn.*`` BatchNorm buffers).

    Reads bare VAE files, full SD checkpoints (``first_stage_model.*``; the rest ignored) and ``vae.*``
    files. The architecture comes from tensor shapes; scaling/shift factors, GroupNorm groups and the
    activation from the file's metadata (written by ``save_ldm``) or a diffusers config.json beside it,
    or ``family`` (sd1, sd2, sdxl, sdxl-fp16-fix, playground, sd3, flux1, flux2: ``model/families.py``),
    else defaults (scaling 0.18215 for 4 latent channels, 1.0 otherwise, with a warning).
    """
    return read_vae(path, scaling_factor=scaling_factor, shift_factor=shift_factor, family=family,
                    allow_nonfinite=allow_nonfinite)[0]
