"""diffusers model folders: where a VAE's config.json is, and changing a few of its fields in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils.files import save_json


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
