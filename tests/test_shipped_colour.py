"""Issue 18: the shipped model keeps colours. Measured with plain diffusers + PIL + numpy only.

The earlier default (kl-f8c4-bsds-cpu, norm_num_groups 32 on 32-channel layers, so every GroupNorm there
was an InstanceNorm) moved the mean of a colour channel by up to 21 levels of 255 on the demo photos and
returned flat colours at 5-9 dB. Issue 18 asks: every demo photo above its bicubic-by-8 PSNR, every
channel's mean within 2 levels of the original's on every demo photo and every Kodak image (when
../shared/data/kodak exists), and on average over 128 px crops.

The shipped kl-f8c4-bsds-urban-cpu (its card: demo photos 1.77, Kodak 1.84, 128 px crops on average under 1)
meets all three, checked here at the issue's 2 levels (the earlier defaults fail them: 3.5 and more). Flat
saturated red, green and blue still come back tinted (strict xfails: they fail the day a model keeps them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kl_autoencoder.samples import sample_paths

MODEL_NAME = "kl-f8c4-bsds-urban-cpu"
MODEL = Path(__file__).resolve().parents[1] / "weights" / MODEL_NAME
KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"
MAX_MEAN_ERROR = 2.0  # levels of 255, per channel: issue 18's target


@pytest.fixture(scope="module")
def vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL.from_pretrained(MODEL, local_files_only=True, torch_dtype=torch.float32).eval()


def _reconstruct(vae, a: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3), through the posterior mean."""
    import torch

    x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _square(im: Image.Image, size: int) -> Image.Image:
    """What `kl-autoencoder demo` feeds the model: short side resized to size (bicubic), centre crop."""
    s = size / min(im.size)
    w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
    im = im.resize((w, h), Image.BICUBIC, reducing_gap=None)
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def _mean_error(a: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Per-channel mean of the reconstruction minus the original's, in levels of 255: (3,)."""
    return rec.reshape(-1, 3).astype(np.float64).mean(0) - a.reshape(-1, 3).astype(np.float64).mean(0)


def _bicubic8(im: Image.Image) -> np.ndarray:
    small = im.resize((im.width // 8, im.height // 8), Image.BICUBIC)
    return np.asarray(small.resize(im.size, Image.BICUBIC))


def _demo_rows(vae) -> list[tuple[str, float, float, list[float]]]:
    rows = []
    for p in sample_paths():
        im = _square(Image.open(p).convert("RGB"), 256)
        a = np.asarray(im)
        rec = _reconstruct(vae, a)
        rows.append((p.name, _psnr(a, rec), _psnr(a, _bicubic8(im)), _mean_error(a, rec).round(2).tolist()))
    assert len(rows) == 4
    return rows


@pytest.fixture(scope="module")
def demo_rows(vae):
    return _demo_rows(vae)


def test_demo_photos_beat_bicubic_f8(demo_rows):
    for name, ours, bicubic, err in demo_rows:
        assert ours > bicubic, demo_rows


def test_demo_photos_keep_their_mean_colour(demo_rows):
    assert max(abs(e) for *_, err in demo_rows for e in err) <= MAX_MEAN_ERROR, demo_rows


def test_128px_crops_keep_colour_on_average(vae):
    """The demo photos at 128 px (where the old model lost up to 19.7 levels of red)."""
    errs = []
    for p in sample_paths():
        a = np.asarray(_square(Image.open(p).convert("RGB"), 128))
        errs.append(_mean_error(a, _reconstruct(vae, a)))
    errs = np.array(errs)  # (4, 3)
    assert np.abs(errs.mean(0)).max() <= MAX_MEAN_ERROR, errs.round(2).tolist()


_SATURATED = pytest.mark.xfail(strict=True, reason="issue 18: saturated flat colours come back tinted (card: 12-24 dB)")


@pytest.mark.parametrize("rgb", [pytest.param((255, 0, 0), marks=_SATURATED), pytest.param((0, 255, 0), marks=_SATURATED),
                                 pytest.param((0, 0, 255), marks=_SATURATED), (224, 172, 140),
                                 (128, 128, 128), (110, 160, 220)])
def test_flat_colour_comes_back(vae, rgb):
    """A solid-colour image came back at 5-9 dB from the old model (every colour pulled towards grey); the
    shipped one keeps grey, sky blue and skin, not yet saturated red, green and blue."""
    a = np.asarray(Image.new("RGB", (64, 64), rgb))
    rec = _reconstruct(vae, a)
    assert np.abs(_mean_error(a, rec)).max() <= 8.0, (rgb, _mean_error(a, rec).round(2).tolist())
    assert _psnr(a, rec) > 25.0


@pytest.mark.slow
@pytest.mark.skipif(not KODAK.is_dir(), reason="../shared/data/kodak is not here (a user's clone has no ../shared)")
def test_kodak_no_colour_cast_on_any_image(vae):
    """Full Kodak images (centre-cropped to a multiple of 8) and their centre 128 px crops."""
    full, crops = [], []
    for p in sorted(KODAK.glob("kodim*.png")):
        im = Image.open(p).convert("RGB")
        w, h = im.width - im.width % 8, im.height - im.height % 8
        im = im.crop(((im.width - w) // 2, (im.height - h) // 2, (im.width - w) // 2 + w, (im.height - h) // 2 + h))
        a = np.asarray(im)
        full.append((p.name, _mean_error(a, _reconstruct(vae, a)).round(2).tolist()))
        top, left = (h - 128) // 2, (w - 128) // 2
        c = np.ascontiguousarray(a[top:top + 128, left:left + 128])
        crops.append(_mean_error(c, _reconstruct(vae, c)))
    assert len(full) == 24
    bad = [(n, e) for n, e in full if max(abs(v) for v in e) > MAX_MEAN_ERROR]
    assert not bad, bad
    assert np.abs(np.mean(crops, axis=0)).max() <= MAX_MEAN_ERROR, np.mean(crops, axis=0).round(2).tolist()
