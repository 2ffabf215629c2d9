"""Reading images robustly and moving between PIL, uint8 arrays and [-1, 1] tensors.

Every odd file a user's dataset holds (CMYK JPEG, 16-bit PNG, RGBA, palette, EXIF rotation,
truncated or non-image bytes) either becomes an RGB image or raises ImageError with a one-line
message naming the file and the problem.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError
from .files import atomic_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# files that accompany images (captions, metadata): not listed as skipped
SIDECAR_EXTENSIONS = (".txt", ".caption", ".json", ".jsonl", ".csv", ".md", ".yaml", ".yml", ".npz", ".safetensors")
log = logging.getLogger("kl_autoencoder")
MAX_PIXELS = 1 << 28  # 268 M pixels (16K x 16K): more is refused rather than exhausting memory


class ImageError(InputError):
    """A file that cannot be used as an image; the message names the file and the reason."""


def scan_images(root: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files under ``root``, recursive and sorted; [(entry, why it was skipped)]). ``root`` may be one file.

    Skipped, with the reason: entries that cannot be read (symlink loops, broken links, no permission),
    anything but a regular file, and files of another type (but caption/metadata sidecars and hidden files,
    which sit beside images by design).
    """
    root = Path(root)
    if root.is_file():
        return [root], []
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    images, skipped = [], []
    for p in sorted(root.rglob("*")):
        try:
            mode = p.stat().st_mode  # follows links: a loop or a broken link raises here
        except OSError as e:
            skipped.append((p, f"unreadable ({e.strerror or e})"))
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            skipped.append((p, "not a regular file"))
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        elif not p.name.startswith(".") and p.suffix.lower() not in SIDECAR_EXTENSIONS:
            skipped.append((p, f"not an image type kl-autoencoder reads ({', '.join(IMAGE_EXTENSIONS)})"))
    return images, skipped


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted); ``root`` may also be a single file.

    What ``scan_images`` skips is logged, one line per entry (the first 20), so nothing is left out unsaid.
    """
    images, skipped = scan_images(root)
    log_skipped(skipped, root)
    return images


def log_skipped(skipped: list[tuple[Path, str]], root: str | Path) -> None:
    """One warning per entry ``scan_images`` skipped (the first 20), then a count."""
    for path, why in skipped[:20]:
        log.warning("skipped %s: %s", os.fsdecode(path), why)
    if len(skipped) > 20:
        log.warning("skipped %d more entries under %s", len(skipped) - 20, root)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) greyscale: Pillow's convert("L") clips instead of scaling
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min(initial=0)), float(a.max(initial=1))
        a = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # transparent pixels have arbitrary colours underneath: composite on white
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, L, 1, P, RGB


def load_image(path: str | Path, *, min_size: int = 1) -> Image.Image:
    """Read ``path`` as an RGB PIL image with EXIF orientation applied.

    Raises ImageError("PATH: reason") for unreadable, truncated, non-image, too small or too large files.
    """
    path = Path(path)
    try:
        return _open_rgb(path, str(path), min_size)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None


def load_image_bytes(data: bytes, name: str, *, min_size: int = 1) -> Image.Image:
    """``load_image`` for bytes already in memory (a tar member); errors name ``name`` (e.g. ``00000.tar/key.jpg``)."""
    return _open_rgb(io.BytesIO(data), name, min_size)


def _open_rgb(fp: Path | BinaryIO, name: str, min_size: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{name}: {img.width}x{img.height} is over the {MAX_PIXELS:,}-pixel limit")
                img.load()  # decode now: truncated files fail here, not later in a worker
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except (ImageError, FileNotFoundError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: too large ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{name}: unreadable image ({msg})") from None
    if min(rgb.size) < min_size:
        raise ImageError(f"{name}: {rgb.width}x{rgb.height} is smaller than {min_size} pixels on a side")
    return rgb


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    return uint8_to_tensor(np.asarray(img.convert("RGB")))


def uint8_to_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) -> float32 (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.array(a, copy=True)) if isinstance(a, np.ndarray) else a
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    if t.ndim not in (3, 4) or t.shape[-1] != 3:
        raise InputError(f"expected uint8 pixels shaped (H, W, 3) or (B, H, W, 3), got {tuple(t.shape)}")
    t = t.permute(*range(t.ndim - 3), -1, -3, -2).float()
    return t / 127.5 - 1.0


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (3, H, W) or (B, 3, H, W) -> uint8 (H, W, 3) / (B, H, W, 3), clamped and rounded."""
    x = x.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(*range(x.ndim - 3), -2, -1, -3).numpy()


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1], (B, 3, H, W) or (3, H, W) -> list of RGB PIL images."""
    a = tensor_to_uint8(x if x.ndim == 4 else x[None])
    return [Image.fromarray(im, "RGB") for im in a]


def as_image_batch(images: torch.Tensor | np.ndarray | Image.Image | Sequence) -> torch.Tensor:
    """Any supported image input -> float32 (B, 3, H, W) in [-1, 1].

    Accepts a float tensor in [-1, 1] (B,3,H,W) or (3,H,W); uint8 tensors or arrays (H,W,3) or
    (B,H,W,3); a PIL image; or a list of PIL images / uint8 arrays of one size.
    """
    if isinstance(images, Image.Image):
        return pil_to_tensor(images)[None]
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given")
        parts = [as_image_batch(im) for im in images]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise InputError(f"images in one batch must share a size, got {sorted(sizes)}")
        return torch.cat(parts)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            images = torch.from_numpy(np.ascontiguousarray(images))
        else:
            t = uint8_to_tensor(images)
            return t if t.ndim == 4 else t[None]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a tensor, array or PIL image, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        t = uint8_to_tensor(images)
        return t if t.ndim == 4 else t[None]
    if not images.is_floating_point():
        raise TypeError(f"image tensors must be float in [-1, 1] or uint8, got {images.dtype}")
    x = images if images.ndim == 4 else images[None] if images.ndim == 3 else None
    if x is None:
        raise InputError(f"image tensors must be (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    if x.shape[1] != 3:
        raise InputError(f"images must have 3 channels (RGB) in dim 1, got shape {tuple(x.shape)}")
    return x


def center_box(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
    """The centred box (left, top, right, bottom) of ``crop_width x crop_height`` in a ``width x height`` image."""
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def fit_crop(img: Image.Image, size: int | None, multiple: int = 8) -> Image.Image:
    """The crop rule of ``eval``, ``score`` and the demo.

    ``size``: the short side is resized to ``size`` (bicubic, antialiased when shrinking) and the centre
    ``size x size`` is kept; ``None``: the centre of the full image, cropped to a multiple of ``multiple``.
    """
    if size is not None:
        s = size / min(img.size)
        w, h = max(size, round(img.width * s)), max(size, round(img.height * s))
        img = img.resize((w, h), Image.BICUBIC, reducing_gap=None)  # PIL's resize is antialiased when shrinking
        cw = ch = size
    else:
        cw, ch = img.width - img.width % multiple, img.height - img.height % multiple
        if cw == 0 or ch == 0:
            raise ImageError(f"{img.width}x{img.height} is smaller than {multiple} pixels on a side")
    return img.crop(center_box(img.width, img.height, cw, ch))


def save_grid(rows: Iterable[Sequence[Image.Image]], path: str | Path, pad: int = 4) -> Path:
    """Paste rows of equally tall PIL images into one PNG (white gaps)."""
    rows = [list(r) for r in rows]
    width = max(sum(im.width for im in r) + pad * (len(r) - 1) for r in rows)
    height = sum(max(im.height for im in r) for r in rows) + pad * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for r in rows:
        x = 0
        for im in r:
            canvas.paste(im, (x, y))
            x += im.width + pad
        y += max(im.height for im in r) + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path
