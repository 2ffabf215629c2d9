"""Single weights files (.safetensors/.ckpt/.pt/.bin/.pth) in diffusers or LDM layout -> AutoencoderKL, strictly.

The architecture comes from tensor shapes, never from the network; every key must be mapped
(``ldm_keys``) and every shape must match, or the error lists the unmapped, missing and misshapen keys.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

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
META_KEY = "kl_autoencoder.config"



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
            out.update({k: v for k, v in json.loads(meta[META_KEY]).items() if k in META_FIELDS})
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
    return {k: data[k] for k in META_FIELDS if k in data} if data.get("_class_name") == "AutoencoderKL" else {}


# ----------------------------------------------------------------------------- strict loading


def _fit(key: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``t`` shaped as ``shape``, or None if it cannot be (only attention 1x1 conv <-> Linear is allowed)."""
    if t.shape == shape:
        return t
    if is_attention_weight(key) and t.numel() == math.prod(shape) and t.shape[:2] == shape[:2]:
        return t.reshape(shape)  # (C, C, 1, 1) / (C, C, 1) <-> (C, C)
    return None


def convert_state_dict(
    sd: dict[str, torch.Tensor], known: dict[str, Any] | None = None, *, where: str = "weights", **overrides: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any supported layout -> (diffusers state dict, AutoencoderKL config), strictly.

    ``known``: config fields shapes cannot tell (META_FIELDS), e.g. from metadata; ``overrides``
    (e.g. scaling_factor=0.13025) beat them, and they beat defaults. Keys outside the VAE prefix of a
    full checkpoint are ignored. Raises ConversionError listing unmapped, missing and misshapen keys.
    """
    sd, prefix = strip_prefix({k: sd[k] for k in vae_keys(list(sd))})
    if prefix:
        log.info("%s: using the %d VAE weights under %r; other keys ignored", where, len(sd), prefix)
    training = [k for k in sd if k.startswith(TRAINING_ONLY_PREFIXES)]
    if training:
        log.info("%s: ignoring %d training-only keys (loss.*: LPIPS and discriminator)", where, len(training))
        sd = {k: v for k, v in sd.items() if k not in training}
    ldm, unmapped = to_ldm_keys(sd)
    config = infer_config(ldm, where)
    config.update({k: v for k, v in (known or {}).items() if k in META_FIELDS})
    config.update({k: v for k, v in overrides.items() if v is not None})
    assumed = "scaling_factor" not in config
    if assumed:
        config["scaling_factor"] = SD_SCALING_FACTOR if config["latent_channels"] == 4 else 1.0
    with torch.device("meta"):  # shapes only: no memory, no random init
        template = AutoencoderKL(**config).state_dict()
    n = len(config["block_out_channels"])
    expected = {ldm_key(k, n): k for k in template}
    if None in expected:  # pragma: no cover - a diffusers release with new parameter names
        raise ConversionError(f"{where}: this diffusers version has AutoencoderKL keys the converter does not know")
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
            f"{where}: not a complete AutoencoderKL ({config['block_out_channels']} channels, "
            f"{config['layers_per_block']} resnets/level) - " + "; ".join(parts)
            + ". Is it a full VAE in diffusers or LDM layout?"
        )
    if assumed:
        log.warning(
            "%s: no scaling_factor stored; assuming %s. Pass scaling_factor=... (SD 1.x/2.x: 0.18215; SDXL: 0.13025; "
            "SD3: 1.5305 with shift 0.0609; FLUX: 0.3611 with shift 0.1159) or measure one with `kl-autoencoder stats`",
            where, config["scaling_factor"],
        )
    return out, config


def build_vae(sd: dict[str, torch.Tensor], config: dict[str, Any], dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """AutoencoderKL with exactly these weights (cast to ``dtype``); no random init is done."""
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return vae.eval()


def read_vae(path: str | Path, **overrides: Any) -> tuple[AutoencoderKL, dict[str, Any]]:
    """(fp32 AutoencoderKL, info) from a weights file; info has the source ``dtype`` and ``layout``."""
    path = Path(path)
    tensors, meta = read_weights(path, select=vae_keys)
    known = {**_sibling_config(path), **_meta_config(meta)}
    sd, config = convert_state_dict(tensors, known, where=str(path), **overrides)
    dtypes = {t.dtype for t in sd.values()}
    src = dtypes.pop() if len(dtypes) == 1 else torch.float32
    layout = "ldm" if any(re.search(r"(^|\.)encoder\.down\.\d", k) for k in tensors) else "diffusers"
    return build_vae(sd, config), {"dtype": src, "layout": layout}


def load_file(path: str | Path, *, scaling_factor: float | None = None, shift_factor: float | None = None) -> AutoencoderKL:
    """A single weights file (.safetensors/.ckpt/.pt/.bin/.pth) in diffusers or LDM layout -> fp32 AutoencoderKL.

    Reads bare VAE files, full SD checkpoints (``first_stage_model.*``; the rest ignored) and ``vae.*``
    files. The architecture comes from tensor shapes; scaling/shift factors, GroupNorm groups and the
    activation from the file's metadata (written by ``save_ldm``) or a diffusers config.json beside it,
    else defaults (scaling 0.18215 for 4 latent channels, 1.0 otherwise, with a warning).
    """
    return read_vae(path, scaling_factor=scaling_factor, shift_factor=shift_factor)[0]
