"""Colour-jittered copies of training photos, plus flat solid-colour images: a training folder for issue 18.

A photo's colours are predictable from its content (grass is green, sky is blue), so a decoder can reconstruct
plausible colours without reading the input's; the earlier default did exactly that, because with 32 groups on its
32-channel layers it could not read them (see tools/model_card_notes.md). Copies whose channels are scaled and
shifted at random (per image) break that shortcut: only the input says what the colour is. Deterministic: image i of
the sorted inputs gets the draws of random.Random(seed * 1_000_003 + i).

    python tools/make_colour_jitter.py ../shared/data/bsds500/train ../shared/data/bsds500/test --out runs/data-jitter
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

EXTS = {".jpg", ".jpeg", ".png"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="folders of training photos (never Kodak or a validation set)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--gain", type=float, default=0.25, help="per-channel gain drawn from 1 +- this")
    ap.add_argument("--shift", type=float, default=30.0, help="per-channel shift drawn from +- this (levels of 255)")
    ap.add_argument("--flat", type=int, default=24, help="flat solid-colour images (384x384) to add")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for d in a.inputs for p in Path(d).rglob("*") if p.suffix.lower() in EXTS)
    for i, p in enumerate(files):
        rng = random.Random(a.seed * 1_000_003 + i)
        x = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
        mean = x.reshape(-1, 3).mean(0)
        gain = np.array([1 + rng.uniform(-a.gain, a.gain) for _ in range(3)], np.float32)
        shift = np.array([rng.uniform(-a.shift, a.shift) for _ in range(3)], np.float32)
        y = np.clip((x - mean) * gain + mean + shift, 0, 255).round().astype(np.uint8)  # gain about the mean: contrast too
        Image.fromarray(y).save(out / f"jitter-{i:04d}-{p.stem}.png")
    rng = random.Random(a.seed * 1_000_003 + 999_999)
    for j in range(a.flat):
        rgb = tuple(rng.randint(0, 255) for _ in range(3))
        Image.new("RGB", (384, 384), rgb).save(out / f"flat-{j:02d}.png")
    print(f"{len(files)} jittered copies and {a.flat} flat images in {out}")


if __name__ == "__main__":
    main()
