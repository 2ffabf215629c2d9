"""Loading a VAE: a diffusers folder, a pipeline folder, a single weights file, or a Hugging Face Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..model import apply_family, resolve_dtype, vae_class
from .folder import vae_folder
from .hub import hub_vae_folder, looks_like_repo_id
from .single_file import load_file


def _load_folder(path: Path, torch_dtype: torch.dtype | None) -> nn.Module:
    """A diffusers VAE folder (or a pipeline's vae/) -> its class (config.json ``_class_name``), from local files only."""
    folder = vae_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: not a diffusers VAE folder (no config.json); export one with `kl-autoencoder export`")
    cfg = folder / "config.json"
    try:
        name = json.loads(cfg.read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError) as e:
        raise FileNotFoundError(f"{cfg}: not a readable config.json ({e})") from None
    return vae_class(name, str(cfg)).from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    subfolder: str | None = None,
    offline: bool | None = None,
    family: str | None = None,
) -> nn.Module:
    """Load a VAE (``AutoencoderKL``, or ``AutoencoderKLFlux2`` for FLUX.2).

    ``path``: a diffusers folder (config.json + weights), a pipeline folder (its ``vae/``), a single weights
    file (.safetensors, .ckpt, .pt, .bin) in diffusers or LDM layout (``single_file.py``), or a Hugging Face
    Hub repo id ``org/name`` (a VAE repo, or a pipeline repo's ``vae`` subfolder; ``revision``, ``subfolder``),
    resolved through huggingface_hub's cache as diffusers' ``from_pretrained`` does: downloaded when online,
    the cache only with ``offline=True`` or ``HF_HUB_OFFLINE=1`` (``hub.py``). A local path wins over a hub id.
    ``family`` (sd1, sd2, sdxl, sdxl-fp16-fix, playground, sd3, flux1, flux2) sets the published latent
    factors and force_upcast (``model/families.py``): for bare weight files, whose factors shapes cannot tell.
    """
    p = Path(path)
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if p.is_dir():
        vae = _load_folder(p, torch_dtype)
    elif p.exists():
        vae = load_file(p, family=family)
        family = None  # applied while converting
    elif looks_like_repo_id(str(path)):
        vae = _load_folder(hub_vae_folder(str(path), revision=revision, subfolder=subfolder, offline=offline), torch_dtype)
    else:
        raise FileNotFoundError(f"{p}: no such model folder or file (nor a Hugging Face Hub id org/name)")
    if family is not None:
        apply_family(vae, family, str(path))
    vae = vae.to(device)
    if torch_dtype is not None:
        vae = vae.to(torch_dtype)
    return vae.eval()
