"""Odd image files: each becomes RGB or fails with one line naming the file."""

import io

import numpy as np
import pytest
from PIL import Image

from kl_autoencoder.utils.images import ImageError, find_images, load_image


def _photo(h=40, w=60):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1).astype(np.uint8)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(_photo()).convert("CMYK").save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (60, 40)


def test_16bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "grey16.png"
    a = (np.linspace(0, 65535, 40 * 60).reshape(40, 60)).astype(np.uint16)
    Image.fromarray(a).save(p)
    im = np.asarray(load_image(p))
    assert im.shape == (40, 60, 3)
    # 65535 -> 255 and a mid-grey stays mid-grey (a clip to 255 would saturate almost everything)
    assert im[-1, -1, 0] == 255 and abs(int(im[20, 30, 0]) - int(a[20, 30] / 257)) <= 1


def test_rgba_composited_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255
    a[:, :4, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(a, "RGBA").save(p)
    im = np.asarray(load_image(p))
    assert (im[:, :4] == [255, 0, 0]).all() and (im[:, 4:] == [255, 255, 255]).all()


def test_palette_and_greyscale(tmp_path):
    p = tmp_path / "pal.png"
    Image.fromarray(_photo()).convert("P").save(p)
    g = tmp_path / "grey.png"
    Image.fromarray(_photo()[..., 0]).save(g)
    assert load_image(p).mode == "RGB" and load_image(g).mode == "RGB"


def test_exif_rotation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.fromarray(_photo(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img.save(p, exif=exif)
    assert load_image(p).size == (40, 60)


def test_truncated_and_fake_files_fail_with_path(tmp_path):
    good = io.BytesIO()
    Image.fromarray(_photo(200, 200)).save(good, "JPEG")
    t = tmp_path / "truncated.jpg"
    t.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(t)
    f = tmp_path / "notes.jpg"
    f.write_text("this is not a jpeg")
    with pytest.raises(ImageError, match=r"notes.jpg: not an image"):
        load_image(f)
    with pytest.raises(ImageError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")


def test_tiny_image_rejected_when_asked(tmp_path):
    p = tmp_path / "tiny.png"
    Image.fromarray(_photo(4, 4)).save(p)
    assert load_image(p).size == (4, 4)
    with pytest.raises(ImageError, match="tiny.png: 4x4 is smaller than 8"):
        load_image(p, min_size=8)


def test_find_images_recursive(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.JPG", "a/b/y.png", "z.webp", "skip.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a/b/y.png", "a/x.JPG", "z.webp"]
