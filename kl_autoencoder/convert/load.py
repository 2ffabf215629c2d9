"""Loading a VAE from a local path: a diffusers folder, a pipeline folder or a single weights file."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ..model import resolve_dtype
from .folder import vae_folder
from .single_file import load_file


def load(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load a VAE from a local path; nothing is fetched from a network.

    ``path``: a diffusers folder (config.json + weights), a pipeline folder (its ``vae/``), or a single
    weights file (.safetensors, .ckpt, .pt, .bin) in diffusers or LDM layout (``single_file.py``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or file")
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if path.is_dir():
        folder = vae_folder(path)
        if folder is None:
            raise FileNotFoundError(f"{path}: not a diffusers VAE folder (no config.json); export one with `kl-autoencoder export`")
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)
    else:
        vae = load_file(path)
    vae = vae.to(device)
    if torch_dtype is not None:
        vae = vae.to(torch_dtype)
    return vae.eval()
