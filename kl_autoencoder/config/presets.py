"""Where the YAML presets live and how a name resolves to one."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent
# A source checkout (or `pip install -e .`) reads the top-level configs/; a wheel carries them
# inside the package (pyproject maps kl_autoencoder.configs to configs/).
_CANDIDATES = (_PACKAGE.parent / "configs", _PACKAGE / "configs")


def configs_dir() -> Path:
    for d in _CANDIDATES:
        if d.is_dir() and any(d.glob("*.yaml")):
            return d
    raise FileNotFoundError(f"no presets found in {' or '.join(map(str, _CANDIDATES))}: reinstall kl-autoencoder")


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def preset_path(preset: str | Path) -> Path:
    """A preset name (``"sd-kl-f8"``) or a path to a YAML file."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: config file not found")
        return p
    candidate = configs_dir() / f"{preset}.yaml"
    if not candidate.is_file():
        raise FileNotFoundError(f"unknown preset {str(preset)!r}; presets: {', '.join(list_presets())} (or give a YAML path)")
    return candidate
