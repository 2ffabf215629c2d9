"""The `kl-autoencoder` command line: the top layer; nothing below ``cli/`` imports it or argparse."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
