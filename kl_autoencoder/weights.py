"""The shipped default model in weights/: where it is and how to find it."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "kl-f8c4-bsds-cpu"
# A source checkout (or editable install) has the top-level weights/; a wheel carries them inside the package.
_CANDIDATES = (_HERE.parent / "weights", _HERE / "weights")


def default_model_path() -> Path:
    """Folder of the shipped default model (a diffusers AutoencoderKL folder)."""
    for root in _CANDIDATES:
        p = root / DEFAULT_MODEL_NAME
        if (p / "config.json").is_file():
            return p
    raise FileNotFoundError(
        f"no shipped model {DEFAULT_MODEL_NAME!r} in {' or '.join(str(c) for c in _CANDIDATES)}: "
        "give MODEL explicitly (a diffusers folder, a weights file or a preset name)"
    )
