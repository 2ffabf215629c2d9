"""Datasets as users keep them, built in tests: img2dataset-style webdataset tars, caption sidecars, metadata tables."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


def photo(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A textured test image (smooth colour field plus noise): not flat, so GroupNorm stays well conditioned."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / 20.0
    a = np.stack([np.sin(xx * (1 + seed % 5)), np.cos(yy * (2 + seed % 3)), np.sin((xx + yy) * 0.5)], -1) * 90 + 128
    return Image.fromarray(np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8))


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with members in the given order (img2dataset writes key.jpg, key.txt, key.json per sample)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_tar(path: Path, shard: int, n: int, *, seed: int = 0, corrupt: set[int] = frozenset(),
                    no_caption: set[int] = frozenset(), sizes: list[tuple[int, int]] | None = None) -> list[str]:
    """Shard ``shard`` of an img2dataset output: keys ``{shard:05d}{i:04d}`` with .jpg, .txt and .json
    (url, caption, key, status, width, height as img2dataset writes them). Returns the keys."""
    members, keys = [], []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        keys.append(key)
        size = sizes[i % len(sizes)] if sizes else (96 + 8 * (i % 3), 80 - 8 * (i % 2))
        img = photo(seed * 1000 + shard * 100 + i, size)
        caption = f"photo {i} of shard {shard}, seed {seed}: a texture in é and ü"
        meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                "width": img.width, "height": img.height, "seed": seed}
        members.append((f"{key}.jpg", CORRUPT if i in corrupt else jpeg(img)))
        if i not in no_caption:
            members.append((f"{key}.txt", caption.encode()))
        members.append((f"{key}.json", json.dumps(meta).encode()))
    write_tar(path, members)
    return keys


def read_with_webdataset(urls: str | list[str]) -> dict[str, dict]:
    """Every sample of the tars as webdataset's own reader sees it: 'TAR/KEY' -> {caption, metadata, image bytes}."""
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        tar = Path(s["__url__"]).name
        out[f"{tar}/{s['__key__']}"] = {"caption": s["txt"].decode() if "txt" in s else "",
                                        "metadata": json.loads(s["json"]) if "json" in s else {}, "jpg": s.get("jpg")}
    return out
