"""What every command shares: the MODEL argument (and --revision/--offline/--family), --tiling/--tile-size,
and the one-line user error."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torch import nn

from ..config import list_presets
from ..convert import load, looks_like_repo_id
from ..errors import KLAutoencoderError
from ..inference import optimize
from ..model import FAMILIES, create, default_model_path, resolve_dtype
from ..utils.images import IMAGE_EXTENSIONS

MODEL_HELP = (
    "a diffusers VAE folder, a pipeline folder (its vae/), a weights file (.safetensors/.ckpt/.pt/.bin), "
    "a Hugging Face Hub id org/name (a VAE repo, or a pipeline repo's vae/; cached as diffusers does), "
    "or a preset name (e.g. tiny-kl-f8) for freshly initialised, untrained weights"
)


class CLIError(KLAutoencoderError):
    """A user error found by a command: printed as one line, exit status 2."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--revision/--offline (hub ids) and --family (bare weight files), shared by every command with a MODEL."""
    g = p.add_argument_group("MODEL options")
    g.add_argument("--revision", default=None, help="hub id MODEL: a branch, tag or commit (default: main)")
    g.add_argument("--offline", action="store_true",
                   help="hub id MODEL: use the Hugging Face cache only, never the network (as HF_HUB_OFFLINE=1)")
    g.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="set the latent factors and force_upcast of a published VAE family (for a bare weights file, "
                   "whose factors cannot be told from its shapes: SD1 and SDXL, SD3 and FLUX.1 share architectures)")


def model_kwargs(args: argparse.Namespace) -> dict:
    """The ``resolve_model`` keyword arguments of ``add_model_args``' options."""
    return {k: getattr(args, k, None) for k in ("revision", "offline", "family")}


def _is_preset(spec: str) -> bool:
    return spec in list_presets() or spec.endswith((".yaml", ".yml"))


def resolve_model(spec: str | None, *, dtype: str | None = None, revision: str | None = None, offline: bool | None = None,
                  family: str | None = None) -> nn.Module:
    """MODEL argument -> VAE (a path, a Hugging Face Hub id, or a preset name or YAML path meaning untrained
    weights), with the CLI's inference path: fast CPU convolutions (off with KL_AUTOENCODER_FASTCONV=0)."""
    if spec is None:
        spec = str(default_model_path())
    p = Path(spec)
    if p.exists() and not (p.is_file() and _is_preset(spec)):
        return optimize(load(p, dtype=dtype, family=family))
    if _is_preset(spec):
        logging.getLogger("kl_autoencoder").warning("MODEL %s is a preset: using freshly initialised (untrained) weights", spec)
        vae = create(spec)
        return optimize(vae.to(resolve_dtype(dtype)) if dtype else vae)
    if looks_like_repo_id(spec):
        return optimize(load(spec, dtype=dtype, revision=revision, offline=offline, family=family))
    raise CLIError(f"MODEL {spec}: no such folder or file, not a Hugging Face Hub id (org/name), and not a preset "
                   f"({', '.join(list_presets())})")


def looks_like_model(spec: str) -> bool:
    """True if ``spec`` names a model rather than an image (for commands whose MODEL is optional)."""
    p = Path(spec)
    if p.is_dir():
        return (p / "config.json").is_file() or (p / "vae" / "config.json").is_file()
    if p.is_file():
        return p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin", ".pth", ".yaml", ".yml")
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return False
    return spec in list_presets() or looks_like_repo_id(spec)


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
