"""The `kl-autoencoder` command: one entry point, one module per subcommand, each imported here by name."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import KLAutoencoderError
from . import (
    check_fp16,
    convert,
    decode,
    demo,
    encode,
    eval,
    export,
    interpolate,
    reconstruct,
    score,
    stats,
    swap,
    train,
)

# In the order `--help` lists them.
COMMANDS = (demo, reconstruct, train, encode, decode, stats, eval, convert, export, swap, check_fp16, interpolate, score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kl-autoencoder",
        description="Train, convert and serve Stable-Diffusion-style KL autoencoders (diffusers AutoencoderKL). "
        "Runs offline: models come from local paths.",
    )
    parser.add_argument("--version", action="version", version=f"kl-autoencoder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a user-facing problem (the package's errors, a missing or unreadable file) is one
    line on stderr and exit status 2. Any other exception is a bug and keeps its traceback."""
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as their own bytes, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (KLAutoencoderError, OSError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
