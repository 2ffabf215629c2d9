"""The `kl-autoencoder` command: one entry point, a subcommand per job.

Core subcommands live here; feature modules listed in ``_COMMAND_MODULES`` add theirs through a
``register_cli(subparsers)`` function, so each feature keeps its CLI beside its code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from . import __version__

# Feature modules that add subcommands (each defines register_cli(subparsers)).
_COMMAND_MODULES: tuple[str, ...] = ("demo", "train", "latents", "stats", "convert", "swap", "fp16", "evaluate", "interpolate", "score")

MODEL_HELP = (
    "a diffusers VAE folder, a pipeline folder (its vae/), a weights file (.safetensors/.ckpt/.pt/.bin), "
    "or a preset name (e.g. tiny-kl-f8) for freshly initialised, untrained weights"
)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def resolve_model(spec: str | None, *, dtype: str | None = None):
    """MODEL argument -> AutoencoderKL (a path, or a preset name meaning untrained weights)."""
    from . import api
    from .presets import list_presets

    from .fastconv import optimize

    if spec is None:
        from .weights import default_model_path

        spec = str(default_model_path())
    p = Path(spec)
    if p.exists():
        # the CLI's inference path: fast CPU convolutions (off with KL_AUTOENCODER_FASTCONV=0)
        return optimize(api.load(p, dtype=dtype))
    if spec in list_presets() or spec.endswith((".yaml", ".yml")):
        logging.getLogger("kl_autoencoder").warning(
            "MODEL %s is a preset: using freshly initialised (untrained) weights", spec
        )
        vae = api.create(spec)
        return optimize(vae.to(api.DTYPES[dtype]) if dtype else vae)
    raise CLIError(f"MODEL {spec}: no such folder or file, and not a preset ({', '.join(list_presets())})")


def looks_like_model(spec: str) -> bool:
    """True if ``spec`` names a model rather than an image (for commands whose MODEL is optional)."""
    from .images import IMAGE_EXTENSIONS
    from .presets import list_presets

    p = Path(spec)
    if p.is_dir():
        return (p / "config.json").is_file() or (p / "vae" / "config.json").is_file()
    if p.is_file():
        return p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
    return spec in list_presets() and p.suffix.lower() not in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from . import api

    vae = resolve_model(args.model)
    out = api.export(vae, args.out, format=args.format, dtype=args.dtype, notes=args.notes)
    print(f"wrote {out} ({args.format}, {args.dtype})")
    return 0


# ----------------------------------------------------------------------------- reconstruct


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from . import api
    from .images import ImageError, find_images, load_image, pil_to_tensor, save_grid, tensor_to_pil

    inputs = list(args.inputs)
    model_spec = None
    if inputs and looks_like_model(inputs[0]):
        model_spec = inputs.pop(0)
    if not inputs:
        raise CLIError("reconstruct: give at least one image or folder")
    vae = resolve_model(model_spec or args.model)
    files = [f for spec in inputs for f in find_images(spec)]
    if not files:
        raise CLIError(f"reconstruct: no images found in {' '.join(inputs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = []
    for f in files:
        try:
            img = load_image(f)
        except ImageError as e:
            print(f"warning: skipped {e}", file=sys.stderr)
            continue
        x = pil_to_tensor(img)[None]  # (1, 3, H, W)
        rec = api.reconstruct(vae, x, **tiling_kwargs(args))
        score = api.psnr(x, rec)
        scores.append(score)
        name = f.stem + "_reconstruction.png"
        save_grid([[img, tensor_to_pil(rec)[0]]], out / name)
        print(f"{f}: PSNR {score:.2f} dB -> {out / name}")
    if not scores:
        raise CLIError("reconstruct: no readable images")
    mean = sum(scores) / len(scores)
    print(f"mean PSNR over {len(scores)} image(s): {mean:.2f} dB")
    api.save_json({"mean_psnr": mean, "n_images": len(scores)}, out / "psnr.json")
    return 0


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tiling/--tile-size, shared by reconstruct, encode and decode."""
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
    """The api.encode/decode keyword arguments for --tiling/--tile-size."""
    return {"tiling": args.tiling, "tile_size": args.tile_size}


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kl-autoencoder",
        description="Train, convert and serve Stable-Diffusion-style KL autoencoders (diffusers AutoencoderKL). "
        "Runs offline: models come from local paths.",
    )
    parser.add_argument("--version", action="version", version=f"kl-autoencoder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "export",
        help="write a model as a diffusers folder (or LDM file)",
        description="Write MODEL as a diffusers folder (config.json + safetensors + model card) that "
        "diffusers.AutoencoderKL.from_pretrained loads with no kl-autoencoder code, or with --format ldm "
        "as one LDM-layout .safetensors file for ComfyUI / AUTOMATIC1111.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("out", metavar="OUT", help="output folder (diffusers) or .safetensors file (ldm)")
    p.add_argument("--format", choices=["diffusers", "ldm"], default="diffusers", help="default: diffusers")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--notes", default=None, help="text for the model card's 'How it was made' section")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "reconstruct",
        help="encode + decode images, write side-by-side PNGs and PSNR",
        description="Encode and decode each image (posterior mean), write ORIGINAL | RECONSTRUCTION PNGs "
        "to --out and print PSNR (dB, uint8 RGB). Sizes that are not multiples of 8 are padded for the "
        "VAE and cropped back. MODEL may be omitted to use the shipped default model.",
    )
    p.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGES", help=f"optional MODEL ({MODEL_HELP}), then image files or folders")
    p.add_argument("--model", default=None, help="MODEL, as an option instead of the first argument")
    p.add_argument("--out", required=True, help="output folder")
    add_tiling_args(p)
    p.set_defaults(func=cmd_reconstruct)

    for name in _COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .config import ConfigError
    from .images import ImageError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, ImageError, FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
