"""What every command shares: the MODEL argument, --tiling/--tile-size, and the one-line user error."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torch import nn

from ..config import list_presets
from ..convert import load
from ..errors import KLAutoencoderError
from ..inference import optimize
from ..model import create, default_model_path, resolve_dtype
from ..utils.images import IMAGE_EXTENSIONS

MODEL_HELP = (
    "a diffusers VAE folder, a pipeline folder (its vae/), a weights file (.safetensors/.ckpt/.pt/.bin), "
    "or a preset name (e.g. tiny-kl-f8) for freshly initialised, untrained weights"
)


class CLIError(KLAutoencoderError):
    """A user error found by a command: printed as one line, exit status 2."""


def resolve_model(spec: str | None, *, dtype: str | None = None) -> nn.Module:
    """MODEL argument -> AutoencoderKL (a path, or a preset name meaning untrained weights), with the
    CLI's inference path: fast CPU convolutions (off with KL_AUTOENCODER_FASTCONV=0)."""
    if spec is None:
        spec = str(default_model_path())
    p = Path(spec)
    if p.exists():
        return optimize(load(p, dtype=dtype))
    if spec in list_presets() or spec.endswith((".yaml", ".yml")):
        logging.getLogger("kl_autoencoder").warning("MODEL %s is a preset: using freshly initialised (untrained) weights", spec)
        vae = create(spec)
        return optimize(vae.to(resolve_dtype(dtype)) if dtype else vae)
    raise CLIError(f"MODEL {spec}: no such folder or file, and not a preset ({', '.join(list_presets())})")


def looks_like_model(spec: str) -> bool:
    """True if ``spec`` names a model rather than an image (for commands whose MODEL is optional)."""
    p = Path(spec)
    if p.is_dir():
        return (p / "config.json").is_file() or (p / "vae" / "config.json").is_file()
    if p.is_file():
        return p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
    return spec in list_presets() and p.suffix.lower() not in IMAGE_EXTENSIONS


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tiling/--tile-size, shared by reconstruct, encode, decode, stats, eval and interpolate."""
    p.add_argument(
        "--tiling",
        choices=["auto", "always", "never", "approx"],
        default="auto",
        help="tiled encode/decode for large images: auto (exact tiling when the memory estimate asks for it), "
        "always (exact tiling), never, approx (approximate low-memory tiling: memory independent of the "
        "image size; GroupNorm statistics from a preview, so not exact: see docs/benchmarks.md)",
    )
    p.add_argument("--tile-size", type=int, default=None, help="tile size in image pixels (multiple of 8; default: automatic)")


def tiling_kwargs(args: argparse.Namespace) -> dict:
    """The inference keyword arguments for --tiling/--tile-size."""
    return {"tiling": args.tiling, "tile_size": args.tile_size}
