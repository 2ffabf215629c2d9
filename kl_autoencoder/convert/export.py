"""Exporting a VAE: a diffusers folder with a model card, or one LDM-layout file."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..model import downsample_factor, latent_normalization, num_parameters, resolve_dtype
from ..utils.files import current_umask, staging_dir
from .ldm_export import save_ldm


def _usage(vae: nn.Module) -> list[str]:
    """The model card's diffusers snippet: load, encode, normalise, decode, for this VAE's normalisation."""
    cls = type(vae).__name__
    norm = latent_normalization(vae)
    head = [f"from diffusers import {cls}", f'vae = {cls}.from_pretrained("PATH/TO/THIS/FOLDER")',
            "z = vae.encode(images).latent_dist.mean          # images in [-1, 1], (B, 3, H, W)"]
    if norm.kind == "scalar":
        s, f = norm.shift_factor or 0.0, norm.scaling_factor
        return head + [f"latents = (z - {s}) * {f}   # what a diffusion model sees", f"images = vae.decode(latents / {f} + {s}).sample"]
    if norm.kind == "per-channel":  # diffusers pipeline_stable_diffusion_xl(_img2img).py
        f = norm.scaling_factor
        return head + ["mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)",
                       "std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)",
                       f"latents = (z - mean) * {f} / std   # what a diffusion model sees (as the SDXL pipelines)",
                       f"images = vae.decode(latents * std / {f} + mean).sample"]
    return head + ["# FLUX.2: Flux2Pipeline._patchify_latents(z), then (p - vae.bn.running_mean) / sqrt(vae.bn.running_var",
                   "# + vae.config.batch_norm_eps) per channel (diffusers pipelines/flux2/pipeline_flux2.py _encode_vae_image)"]


def model_card(vae: nn.Module, dtype: str, notes: str | None, name: str) -> str:
    """README.md of an exported folder: architecture, latent normalisation and how to use it with diffusers."""
    c = vae.config
    f = downsample_factor(vae)
    lines = [
        f"# {name}",
        "",
        f"A KL autoencoder (diffusers `{type(vae).__name__}`) exported by kl-autoencoder.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {num_parameters(vae):,} |",
        f"| block_out_channels | {list(c.block_out_channels)} |",
        f"| layers_per_block | {c.layers_per_block} |",
        f"| latent | {c.latent_channels} channels at 1/{f} of the image size |",
        f"| quant convs | {getattr(c, 'use_quant_conv', True)} / {getattr(c, 'use_post_quant_conv', True)} |",
    ]
    norm = latent_normalization(vae)
    if norm.kind == "batchnorm":
        lines.append(f"| latent normalisation | {norm.describe()} |")
    else:
        lines += [f"| scaling_factor | {c.scaling_factor} |", f"| shift_factor | {getattr(c, 'shift_factor', None)} |"]
        if norm.kind == "per-channel":
            lines += [f"| latents_mean | {list(norm.mean)} |", f"| latents_std | {list(norm.std)} |"]
    lines += [f"| weights dtype | {dtype} |", "", "## Use", "", "```python", *_usage(vae), "```"]
    if notes:
        lines += ["", "## How it was made", "", notes.strip()]
    return "\n".join(lines) + "\n"


def export(
    vae: nn.Module,
    out: str | Path,
    *,
    format: str = "diffusers",
    dtype: str = "fp32",
    notes: str | None = None,
    name: str | None = None,
    force: bool = False,
    allow_nonstandard: bool = False,
) -> Path:
    """Write ``vae`` for other tools; the model itself is not changed.

    ``format="diffusers"``: a folder with config.json, diffusion_pytorch_model.safetensors and a
    README.md model card, loadable by ``AutoencoderKL.from_pretrained``. ``format="ldm"``: one
    .safetensors file in CompVis/LDM key layout (ComfyUI, AUTOMATIC1111), refused for an architecture
    those tools cannot build unless ``allow_nonstandard`` (``ldm_export.py``). ``dtype``: fp32, fp16, bf16. Files are
    written ``0666 & ~umask`` (0644 under the usual umask 022), not safetensors' 0600. An existing output is
    refused (FileExistsError) unless ``force``, which replaces it file by file.
    """
    torch_dtype = resolve_dtype(dtype)
    out = Path(out)
    if format == "ldm":
        return save_ldm(vae, out, dtype=dtype, force=force, allow_nonstandard=allow_nonstandard)
    if format != "diffusers":
        raise InputError(f"format {format!r}: choose diffusers or ldm")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty; choose another output, or pass --force (force=True) to replace it")
    half = copy.deepcopy(vae)
    for t in list(half.parameters()) + list(half.buffers()):  # cast tensors, not the module: no diffusers upcast warning
        if t.is_floating_point():
            t.data = t.data.to(torch_dtype)
    with staging_dir(out, "export") as tmp:  # replaced file by file: an interrupted export leaves no half-written file
        half.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~current_umask())  # safetensors writes 0600: readable as the umask says
        (tmp / "README.md").write_text(model_card(vae, dtype, notes, name or out.name))
    return out
