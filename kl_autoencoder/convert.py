"""Strict, offline conversion between diffusers and CompVis/LDM AutoencoderKL weights.

One rule table maps a diffusers key to its LDM key (``ldm_key``); the reverse direction is that
table applied to every key of the model the file's shapes describe, so the two directions cannot
disagree. Every key must be mapped and every shape must match, or the error lists the unmapped and
missing keys. The architecture comes from tensor shapes, never from the network.

Key layouts (diffusers scripts/convert_vae_pt_to_diffusers.py, loaders/single_file_utils.py
``convert_ldm_vae_checkpoint``, scripts/convert_diffusers_to_original_stable_diffusion.py):

    diffusers                                  LDM
    encoder.down_blocks.i.resnets.j.*          encoder.down.i.block.j.*   (conv_shortcut -> nin_shortcut)
    encoder.down_blocks.i.downsamplers.0.conv  encoder.down.i.downsample.conv
    decoder.up_blocks.i.resnets.j.*            decoder.up.(n-1-i).block.j.*   (LDM counts up blocks from the bottom)
    decoder.up_blocks.i.upsamplers.0.conv      decoder.up.(n-1-i).upsample.conv
    *.mid_block.resnets.0 / 1                  *.mid.block_1 / block_2
    *.mid_block.attentions.0.group_norm        *.mid.attn_1.norm
    *.mid_block.attentions.0.to_q/k/v          *.mid.attn_1.q/k/v          (Linear (C,C) <-> 1x1 conv (C,C,1,1))
    *.mid_block.attentions.0.to_out.0          *.mid.attn_1.proj_out
    *.conv_norm_out                            *.norm_out
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from .checkpoint_io import CheckpointError, read_weights

log = logging.getLogger("kl_autoencoder")

SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x VAE (CompVis configs/stable-diffusion/v1-inference.yaml)
# Prefixes under which a VAE sits inside a bigger checkpoint (full SD .ckpt; some merged files use vae.)
VAE_PREFIXES = ("first_stage_model.", "vae.")
# An LDM autoencoder training checkpoint also holds its loss (LPIPS + discriminator): not model weights
TRAINING_ONLY_PREFIXES = ("loss.",)
# Config fields kept in LDM safetensors metadata, since shapes cannot tell them (GroupNorm groups, activation)
META_FIELDS = ("scaling_factor", "shift_factor", "norm_num_groups", "act_fn", "sample_size", "force_upcast")
META_KEY = "kl_autoencoder.config"
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RESNET = r"(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)"


class ConversionError(CheckpointError):
    """Weights that do not form a complete AutoencoderKL; the message lists the offending keys."""


# ----------------------------------------------------------------------------- key mapping


def _resnet_part(name: str) -> str:
    return name.replace("conv_shortcut", "nin_shortcut")


def ldm_key(key: str, num_levels: int) -> str | None:
    """A current-diffusers AutoencoderKL key -> its LDM key; None if the key is not part of the layout."""
    n = num_levels
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"(post_quant_conv|quant_conv)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET}", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_part(m[3])}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET}", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_resnet_part(m[3])}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.{_RESNET}", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_part(m[3])}.{m[4]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_ATTN_LDM[m[2]]}.{m[3]}"
    return None


def is_attention_weight(key: str) -> bool:
    """Attention projections: Linear (C, C) in diffusers, 1x1 conv (C, C, 1, 1) in LDM."""
    return bool(re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$|attn_1\.(q|k|v|proj_out)\.weight$", key))


def _modernise(key: str) -> str:
    """Legacy diffusers attention names (before 0.14: query/key/value/proj_attn) -> current ones."""
    m = re.fullmatch(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", key)
    return f"{m[1]}{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else key


def _num_levels(keys: list[str], pattern: str) -> int:
    idx = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def vae_keys(keys: list[str]) -> list[str]:
    """The keys that belong to the VAE: those under the first VAE prefix present, else all."""
    for prefix in VAE_PREFIXES:
        sub = [k for k in keys if k.startswith(prefix)]
        if sub:
            return sub
    return keys


def _strip_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The VAE part of a bigger checkpoint with its prefix removed, and the prefix."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return sd, ""


def to_ldm_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict in any supported layout -> (LDM-keyed dict, keys that map to nothing).

    diffusers keys (current or legacy names) are renamed; LDM keys pass through. Tensors are not
    reshaped here (``_fit`` does that against the expected shape).
    """
    keys = list(sd)
    n = max(_num_levels(keys, r"encoder\.down_blocks\.(\d+)\."), _num_levels(keys, r"decoder\.up_blocks\.(\d+)\."))
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for k, v in sd.items():
        if "_blocks." in k or "mid_block." in k or "conv_norm_out" in k:  # diffusers names
            new = ldm_key(_modernise(k), n)
        else:  # LDM names, or names both layouts share (conv_in, quant_conv); checked against the model later
            new = k
        if new is None or new in out:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped


# ----------------------------------------------------------------------------- architecture


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
    n = _num_levels(list(ldm), r"encoder\.down\.(\d+)\.")
    if n == 0:
        raise ConversionError(f"{where}: no encoder.down.* / encoder.down_blocks.* weights: not an AutoencoderKL VAE checkpoint")
    channels = []
    for i in range(n):
        shape = _first_shape(ldm, rf"encoder\.down\.{i}\.block\.\d+\.conv2\.weight")
        if shape is None:
            raise ConversionError(f"{where}: missing key encoder.down.{i}.block.0.conv2.weight: cannot tell level {i}'s channels")
        channels.append(int(shape[0]))
    layers = _num_levels(list(ldm), r"encoder\.down\.\d+\.block\.(\d+)\.")
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


def _examples(keys: list[str], k: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - k} more)" if len(keys) > k else ""
    return ", ".join(keys[:k]) + more


def convert_state_dict(
    sd: dict[str, torch.Tensor], known: dict[str, Any] | None = None, *, where: str = "weights", **overrides: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any supported layout -> (diffusers state dict, AutoencoderKL config), strictly.

    ``known``: config fields shapes cannot tell (META_FIELDS), e.g. from metadata; ``overrides``
    (e.g. scaling_factor=0.13025) beat them, and they beat defaults. Keys outside the VAE prefix of a
    full checkpoint are ignored. Raises ConversionError listing unmapped, missing and misshapen keys.
    """
    sd, prefix = _strip_prefix({k: sd[k] for k in vae_keys(list(sd))})
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
            parts.append(f"{len(missing)} missing key(s): {_examples(missing)}")
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped key(s): {_examples(unmapped)}")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatch(es): {_examples(bad_shapes, 3)}")
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


# ----------------------------------------------------------------------------- writing


def to_ldm_state_dict(vae_or_sd: AutoencoderKL | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL (or its state dict) -> LDM-keyed state dict, attention as (C, C, 1, 1)."""
    sd = vae_or_sd.state_dict() if isinstance(vae_or_sd, torch.nn.Module) else vae_or_sd
    sd = {_modernise(k): v for k, v in sd.items()}
    n = _num_levels(list(sd), r"encoder\.down_blocks\.(\d+)\.")
    out, unmapped = {}, []
    for k, v in sd.items():
        lk = ldm_key(k, n)
        if lk is None:
            unmapped.append(k)
            continue
        out[lk] = v[:, :, None, None] if is_attention_weight(k) and v.ndim == 2 else v  # Linear -> 1x1 conv
    if unmapped:
        raise ConversionError(f"{len(unmapped)} key(s) have no LDM name: {_examples(unmapped)}")
    return out


def ldm_metadata(config: Any) -> dict[str, str]:
    fields = {k: config.get(k) if isinstance(config, dict) else getattr(config, k, None) for k in META_FIELDS}
    meta = {"format": "pt", META_KEY: json.dumps(fields)}
    meta["scaling_factor"] = str(fields["scaling_factor"])
    if fields["shift_factor"] is not None:
        meta["shift_factor"] = str(fields["shift_factor"])
    return meta


def save_ldm(vae: AutoencoderKL, out: str | Path, *, dtype: str = "fp32") -> Path:
    """Write ``vae`` as one LDM-layout .safetensors (ComfyUI, AUTOMATIC1111); returns the path written.

    The metadata keeps scaling/shift factor, GroupNorm groups and activation, which ``load_file`` reads back.
    """
    from safetensors.torch import save_file

    from .api import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.suffix == "":
        out = out.with_name(out.name + ".safetensors")
    if out.suffix.lower() != ".safetensors" or out.is_dir():
        raise ValueError(f"{out}: an LDM export is one .safetensors file; give a path ending in .safetensors")
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in to_ldm_state_dict(vae).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=ldm_metadata(vae.config))
    os.replace(tmp, out)  # never a half-written file under the final name
    return out


# ----------------------------------------------------------------------------- CLI


def cmd_convert(args: Any) -> int:
    from . import api
    from .api import DTYPES

    src = Path(args.input)
    if src.is_dir():
        vae, info = api.load(src), {"dtype": None, "layout": "diffusers"}
        vae.register_to_config(**{k: v for k, v in (("scaling_factor", args.scaling_factor), ("shift_factor", args.shift_factor)) if v is not None})
    else:
        vae, info = read_vae(src, scaling_factor=args.scaling_factor, shift_factor=args.shift_factor)
    names = {v: k for k, v in DTYPES.items()}
    dtype = args.dtype or names.get(info["dtype"] or next(vae.parameters()).dtype, "fp32")
    out = save_ldm(vae, args.output, dtype=dtype) if args.to == "ldm" else api.export(vae, args.output, dtype=dtype)
    c = vae.config
    print(
        f"{src} ({info['layout']}) -> {out} ({args.to}, {dtype}): channels {list(c.block_out_channels)}, "
        f"{c.layers_per_block} resnets/level, {c.latent_channels} latent channels, "
        f"scaling {c.scaling_factor}, shift {c.shift_factor}"
    )
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a VAE between diffusers and LDM layouts (strict, offline)",
        description="Convert a VAE between a diffusers folder and one LDM-layout .safetensors file "
        "(ComfyUI / AUTOMATIC1111). IN may be a diffusers folder, a pipeline folder, or a weights file "
        "(.safetensors/.ckpt/.pt/.bin/.pth) in either layout, including full SD checkpoints "
        "(first_stage_model.*). Every key must map and every shape must match; pickles are read "
        "weights-only (code in them never runs). The architecture is read from tensor shapes.",
    )
    p.add_argument("input", metavar="IN", help="diffusers folder or weights file")
    p.add_argument("output", metavar="OUT", help="output folder (--to diffusers) or .safetensors file (--to ldm)")
    p.add_argument("--to", choices=["diffusers", "ldm"], required=True, help="target layout")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="weights dtype (default: as stored in a weights file IN; fp32 for a folder)")
    p.add_argument("--scaling-factor", type=float, default=None, help="set the latent scaling factor (default: from IN's metadata)")
    p.add_argument("--shift-factor", type=float, default=None, help="set the latent shift factor (default: from IN's metadata)")
    p.set_defaults(func=cmd_convert)
