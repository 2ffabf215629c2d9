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
from ..inference.runtime import prepare
from ..model import FAMILIES, create, default_model_path
from ..utils.images import IMAGE_EXTENSIONS
from ..utils.locks import LOCK_NAME

MODEL_HELP = (
    "a diffusers VAE folder, a pipeline folder (its vae/), a weights file (.safetensors/.ckpt/.pt/.bin), "
    "a Hugging Face Hub id org/name (a VAE repo, or a pipeline repo's vae/; cached as diffusers does), "
    "or a preset name (e.g. tiny-kl-f8) for freshly initialised, untrained weights"
)


class CLIError(KLAutoencoderError):
    """A user error found by a command: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, steps, batch sizes), checked before any work."""
    return _at_least(int, text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (counts where 0 means none, worker processes)."""
    return _at_least(int, text, 0)


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (minutes, sigmas)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return v


def _at_least(kind: type, text: str, low: int) -> int:
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{v} must be >= {low}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--revision/--offline (hub ids) and --family (bare weight files), shared by every command with a MODEL."""
    g = p.add_argument_group("MODEL options")
    g.add_argument("--revision", default=None, help="hub id MODEL: a branch, tag or commit (default: main)")
    g.add_argument("--offline", action="store_true",
                   help="hub id MODEL: use the Hugging Face cache only, never the network (as HF_HUB_OFFLINE=1)")
    g.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="set the latent factors and force_upcast of a published VAE family (for a bare weights file, "
                   "whose factors cannot be told from its shapes: SD1 and SDXL, SD3 and FLUX.1 share architectures)")
    g.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN/inf values (refused otherwise)")


def model_kwargs(args: argparse.Namespace) -> dict:
    """The ``resolve_model`` keyword arguments of ``add_model_args``' options."""
    return {k: getattr(args, k, None) for k in ("revision", "offline", "family", "allow_nonfinite")}


def _is_preset(spec: str) -> bool:
    return spec in list_presets() or spec.endswith((".yaml", ".yml"))


def resolve_model(spec: str | None, *, dtype: str | None = None, device: str | None = None, compile: bool = False,
                  channels_last: bool = False, revision: str | None = None, offline: bool | None = None,
                  family: str | None = None, allow_nonfinite: bool | None = None) -> nn.Module:
    """MODEL argument -> VAE (a path, a Hugging Face Hub id, or a preset name or YAML path meaning untrained
    weights), put where it runs (``inference/runtime.py``: CUDA when available, else the CPU with the fast
    convolutions, off with KL_AUTOENCODER_FASTCONV=0)."""
    if spec is None:
        spec = str(default_model_path())
    p = Path(spec)
    if p.exists() and not (p.is_file() and _is_preset(spec)):
        vae = load(p, family=family, allow_nonfinite=bool(allow_nonfinite))
    elif _is_preset(spec):
        logging.getLogger("kl_autoencoder").warning("MODEL %s is a preset: using freshly initialised (untrained) weights", spec)
        vae = create(spec)
    elif looks_like_repo_id(spec):
        vae = load(spec, revision=revision, offline=offline, family=family, allow_nonfinite=bool(allow_nonfinite))
    else:
        raise CLIError(f"MODEL {spec}: no such folder or file, not a Hugging Face Hub id (org/name), and not a preset "
                       f"({', '.join(list_presets())})")
    return prepare(vae, device=device, dtype=dtype, compile=compile, channels_last=channels_last)


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
    p.add_argument("--tile-size", type=positive_int, default=None, help="tile size in image pixels (multiple of 8; default: automatic)")


def tiling_kwargs(args: argparse.Namespace) -> dict:
    """The inference keyword arguments for --tiling/--tile-size."""
    return {"tiling": args.tiling, "tile_size": args.tile_size}


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--device/--dtype/--compile/--channels-last: where and how the VAE runs (``inference/runtime.py``)."""
    p.add_argument("--device", default=None, help="where the VAE runs: cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="run the VAE in this dtype (default fp32). fp16 with force_upcast in the model's config runs "
                   "in fp32 as diffusers' SDXL pipelines do; fp16 on a CPU runs in fp32 (one-line warning)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder (minutes to compile; "
                   "for long GPU jobs; on a CPU it replaces the faster built-in convolutions)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (a GPU speed-up with cuDNN)")


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """The resolve_model keyword arguments of add_runtime_args."""
    return {"device": args.device, "dtype": args.dtype, "compile": args.compile, "channels_last": args.channels_last}


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write into an existing output (files of the same name are replaced)")


def check_output(path: str | Path, force: bool, *, folder: bool) -> None:
    """Refuse an existing output (a non-empty folder, or a file) unless --force: nothing written before is lost."""
    p = Path(path)
    # the lock file a finished or killed job of ours leaves (filelock keeps it) is not the user's output
    exists = (p.is_dir() and any(not c.name.startswith(LOCK_NAME) for c in p.iterdir())) if folder else p.exists()
    if exists and not force:
        kind = "folder is not empty" if folder else "file exists"
        raise CLIError(f"{p}: the output {kind}; choose another output, or pass --force to replace what is there")
