"""The shipped default model in the checkout's ``weights/``: where it is."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "kl-f8c4-bsds-urban-cpu"
# A source checkout (or `pip install -e .`) has the top-level weights/. A wheel carries no weights
# (pyproject.toml packages none): there MODEL must be given explicitly.
_WEIGHTS = Path(__file__).resolve().parent.parent.parent / "weights"


def default_model_path() -> Path:
    """Folder of the shipped default model (a diffusers AutoencoderKL folder)."""
    p = _WEIGHTS / DEFAULT_MODEL_NAME
    if (p / "config.json").is_file():
        return p
    raise FileNotFoundError(
        f"no shipped model {DEFAULT_MODEL_NAME!r} in {_WEIGHTS} (it comes with a source checkout, not a wheel): "
        "give MODEL explicitly (a diffusers folder, a weights file, a hub id or a preset name)"
    )
