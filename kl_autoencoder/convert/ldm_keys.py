"""The diffusers <-> CompVis/LDM AutoencoderKL key layouts: one rule table, used in both directions.

One rule table maps a diffusers key to its LDM key (``ldm_key``); the reverse direction is that
table applied to every key of the model the file's shapes describe, so the two directions cannot
disagree. Strict loading on top of it is ``single_file.py``; writing LDM files ``ldm_export.py``.

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
    bn.running_mean / running_var / ...        bn.*   (FLUX.2's latent BatchNorm, AutoencoderKLFlux2; same name)

The original FLUX.2 file names its quant convs ``encoder.quant_conv`` / ``decoder.post_quant_conv``
(ComfyUI comfy/sd.py renames them to ``quant_conv`` / ``post_quant_conv`` when it finds
``bn.running_mean``); ``to_ldm_keys`` does the same.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .weight_files import CheckpointError

# Prefixes under which a VAE sits inside a bigger checkpoint (full SD .ckpt; some merged files use vae.)
VAE_PREFIXES = ("first_stage_model.", "vae.")
# An LDM autoencoder training checkpoint also holds its loss (LPIPS + discriminator): not model weights
TRAINING_ONLY_PREFIXES = ("loss.",)
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_RESNET = r"(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)"
# FLUX.2 original-file names -> the shared ones (ComfyUI comfy/sd.py VAE.__init__, state_dict_prefix_replace)
_ALIASES = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


class ConversionError(CheckpointError):
    """Weights that do not form a complete AutoencoderKL; the message lists the offending keys."""


def examples(keys: list[str], k: int = 5) -> str:
    """The first ``k`` of ``keys`` (sorted), and how many more."""
    keys = sorted(keys)
    more = f" (+{len(keys) - k} more)" if len(keys) > k else ""
    return ", ".join(keys[:k]) + more


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
    if re.fullmatch(r"bn\.(running_mean|running_var|num_batches_tracked)", key):  # AutoencoderKLFlux2
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


def modernise(key: str) -> str:
    """Legacy diffusers attention names (before 0.14: query/key/value/proj_attn) -> current ones."""
    m = re.fullmatch(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", key)
    return f"{m[1]}{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else key


def num_levels(keys: list[str], pattern: str) -> int:
    idx = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def vae_keys(keys: list[str]) -> list[str]:
    """The keys that belong to the VAE: those under the first VAE prefix present, else all."""
    for prefix in VAE_PREFIXES:
        sub = [k for k in keys if k.startswith(prefix)]
        if sub:
            return sub
    return keys


def strip_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
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
    n = max(num_levels(keys, r"encoder\.down_blocks\.(\d+)\."), num_levels(keys, r"decoder\.up_blocks\.(\d+)\."))
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for k, v in sd.items():
        if "_blocks." in k or "mid_block." in k or "conv_norm_out" in k:  # diffusers names
            new = ldm_key(modernise(k), n)
        else:  # LDM names, or names both layouts share (conv_in, quant_conv, bn); checked against the model later
            new = next((a + k[len(b):] for b, a in _ALIASES.items() if k.startswith(b)), k)
        if new is None or new in out:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped


def to_ldm_state_dict(vae_or_sd: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL (or its state dict) -> LDM-keyed state dict, attention as (C, C, 1, 1)."""
    sd = vae_or_sd.state_dict() if isinstance(vae_or_sd, nn.Module) else vae_or_sd
    sd = {modernise(k): v for k, v in sd.items()}
    n = num_levels(list(sd), r"encoder\.down_blocks\.(\d+)\.")
    out, unmapped = {}, []
    for k, v in sd.items():
        lk = ldm_key(k, n)
        if lk is None:
            unmapped.append(k)
            continue
        out[lk] = v[:, :, None, None] if is_attention_weight(k) and v.ndim == 2 else v  # Linear -> 1x1 conv
    if unmapped:
        raise ConversionError(f"{len(unmapped)} key(s) have no LDM name: {examples(unmapped)}")
    return out
