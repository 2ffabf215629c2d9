"""Writing a VAE as one LDM-layout .safetensors file (ComfyUI, AUTOMATIC1111), only when they can use it.

ComfyUI and AUTOMATIC1111 read no config from a VAE file: they build SD's fixed first-stage layout and
load the weights into it, taking only the latent channel count from the file.

* ComfyUI comfy/sd.py ``VAE.__init__`` (commit 0920e0e): when ``decoder.conv_in.weight`` is present,
  ``ddconfig = {'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, ...}`` and
  ``z_channels = sd["decoder.conv_in.weight"].shape[1]``; ``AutoencoderKL(ddconfig, embed_dim=4)`` when the
  file has ``quant_conv.weight`` (SD, SDXL), else ``AutoencodingEngine`` without quant convs (SD3, FLUX.1);
  comfy/ldm/modules/diffusionmodules/model.py: ``Normalize()`` is ``GroupNorm(num_groups=32)``, the
  activation is swish (SiLU) and the Encoder/Decoder always build ``mid.attn_1``.
* AUTOMATIC1111 modules/sd_vae.py ``_load_vae_dict``: ``model.first_stage_model.load_state_dict(vae_dict)``
  into the loaded checkpoint's own first stage (CompVis v1-inference.yaml / SDXL's ddconfig: the same layout).

So another width or depth fails there with size mismatches, and another GroupNorm group count or
activation (not visible in the weights' shapes) loads silently and decodes wrong images. ``save_ldm``
refuses such a model, with the reason and the alternative, unless ``allow_nonstandard=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..model import resolve_dtype
from ..utils.files import atomic_path
from .ldm_keys import to_ldm_state_dict
from .single_file import EXTRA_META_FIELDS, META_FIELDS, META_KEY

# The layout ComfyUI and AUTOMATIC1111 build (module doc): shape-visible fields, then the invisible ones
SD_LAYOUT = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
             "mid_block_add_attention": True}
SD_INVISIBLE = {"norm_num_groups": 32, "act_fn": "silu"}  # not in the weights: a mismatch decodes garbage silently
SD_LATENTS = {4: True, 16: False}  # latent channels -> quant convs (SD/SDXL: with; SD3/FLUX.1: without)


class IncompatibleLayoutError(InputError):
    """A model ComfyUI / AUTOMATIC1111 cannot build from an LDM file; the message says why and what to use."""


def _value(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def ldm_layout_problems(vae: nn.Module) -> list[str]:
    """Why ComfyUI / AUTOMATIC1111 could not use ``vae`` as an LDM file (empty when they can)."""
    c = vae.config
    if type(vae).__name__ != "AutoencoderKL":
        return [f"a {type(vae).__name__} ({c.latent_channels} latent channels with BatchNorm-normalised 2x2 patches): "
                "their LDM loader builds SD's AutoencoderKL"]
    problems = [f"{k} {list(c[k]) if isinstance(c[k], (list, tuple)) else c[k]} (they build {list(v) if isinstance(v, tuple) else v})"
                for k, v in SD_LAYOUT.items() if _value(c[k]) != v]
    problems += [f"{k} {c[k]!r} (they build {v!r}; not in the weights, so it would load silently and decode wrong images)"
                 for k, v in SD_INVISIBLE.items() if c[k] != v]
    quant = bool(c.use_quant_conv) and bool(c.use_post_quant_conv)
    if SD_LATENTS.get(c.latent_channels) is not quant or c.use_quant_conv != c.use_post_quant_conv:
        problems.append(f"{c.latent_channels} latent channels {'with' if quant else 'without'} quant convs (they build 4 with "
                        "quant convs, as SD/SDXL, or 16 without, as SD3/FLUX.1)")
    return problems


def ldm_metadata(config: Any) -> dict[str, str]:
    """safetensors metadata: the config fields shapes cannot tell (``META_FIELDS``, and ``EXTRA_META_FIELDS``
    when set), read back by ``load_file``."""
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    fields = {k: get(k) for k in META_FIELDS}
    fields.update({k: _plain(get(k)) for k in EXTRA_META_FIELDS if get(k) is not None})
    meta = {"format": "pt", META_KEY: json.dumps(fields)}
    if fields["scaling_factor"] is not None:
        meta["scaling_factor"] = str(fields["scaling_factor"])
    if fields["shift_factor"] is not None:
        meta["shift_factor"] = str(fields["shift_factor"])
    return meta


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def save_ldm(vae: nn.Module, out: str | Path, *, dtype: str = "fp32", force: bool = False,
             allow_nonstandard: bool = False) -> Path:
    """Write ``vae`` as one LDM-layout .safetensors (ComfyUI, AUTOMATIC1111); returns the path written.

    Refuses (IncompatibleLayoutError, nothing written) a model whose architecture differs from the one
    those tools build (module doc), unless ``allow_nonstandard``; an existing file unless ``force``. The metadata keeps scaling/shift factor, GroupNorm
    groups, activation (and latents_mean/std, FLUX.2's BatchNorm fields), which ``load_file`` reads back.
    """
    torch_dtype = resolve_dtype(dtype)
    out = Path(out)
    if out.suffix == "":
        out = out.with_name(out.name + ".safetensors")
    if out.suffix.lower() != ".safetensors" or out.is_dir():
        raise InputError(f"{out}: an LDM export is one .safetensors file; give a path ending in .safetensors")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists; choose another output, or pass --force (force=True) to replace it")
    problems = ldm_layout_problems(vae)
    if problems and not allow_nonstandard:
        raise IncompatibleLayoutError(
            f"refusing to write {out}: ComfyUI and AUTOMATIC1111 build every KL-VAE file with SD's fixed layout and read "
            f"only the latent channel count from it, and this model differs: {'; '.join(problems)}. Export the diffusers "
            "folder instead (`kl-autoencoder export MODEL OUT`, loaded with `from_pretrained`), or load an LDM file with "
            "its config: diffusers `AutoencoderKL.from_single_file(path, config=FOLDER)`; --allow-nonstandard "
            "(allow_nonstandard=True) writes it anyway"
        )
    tensors = {k: (v.detach().to("cpu", torch_dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in to_ldm_state_dict(vae).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # never a half-written file under the final name; mode 0666 & ~umask
        save_file(tensors, str(tmp), metadata=ldm_metadata(vae.config))
    return out
