"""diffusers model folders: where a VAE's config.json is, and changing a few of its fields (or tensors) in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_path, save_json

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def vae_folder(path: str | Path) -> Path | None:
    """The folder holding a VAE's config.json: ``path`` itself, or a pipeline's ``path/vae``; None if neither."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    return None


def update_config(model_dir: str | Path, **fields: Any) -> Path:
    """Set ``fields`` in a diffusers VAE folder's config.json (atomically); returns the file's path."""
    folder = vae_folder(model_dir)
    if folder is None:
        raise FileNotFoundError(f"{model_dir}: no config.json (a diffusers model folder is needed; export one with "
                                "`kl-autoencoder export`)")
    cfg = folder / "config.json"
    data = json.loads(cfg.read_text())
    data.update(fields)
    save_json(data, cfg)
    return cfg


def update_weights(model_dir: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Replace a few tensors (e.g. FLUX.2's ``bn.running_mean``) in a diffusers VAE folder's safetensors file,
    atomically, each kept in the file's dtype and shape; the other tensors and the metadata are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = vae_folder(model_dir)
    path = folder / WEIGHTS_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {WEIGHTS_FILE} (a diffusers model folder with safetensors weights is needed)")
    with safe_open(str(path), framework="pt") as f:
        meta, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for k, t in tensors.items():
        if k not in data or data[k].numel() != t.numel():
            raise ValueError(f"{path}: has no tensor {k} of {t.numel()} values to replace")
        data[k] = t.reshape(data[k].shape).to(data[k].dtype)
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)
    return path
