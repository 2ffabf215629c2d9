"""Four public-domain / CC0 photos (see SOURCES.md) that ship with the package."""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent


def sample_paths() -> list[Path]:
    """Paths of the bundled sample photos, sorted."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg"))
