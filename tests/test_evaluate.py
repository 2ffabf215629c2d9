"""The eval report: metrics agree with independent computations; missing weights never stop the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

import kl_autoencoder as ka

from kl_autoencoder.evaluation import fid, lpips
from kl_autoencoder.utils.images import pil_to_tensor, tensor_to_uint8

from conftest import sample_photos

from kl_autoencoder.evaluation import report as ev


def _psnr_numpy(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


def _ssim_skimage(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(sample_photos(None)[:3]):
        im.crop((0, 0, 75, 61)).save(d / f"p{i}.png")  # odd sizes: cropped to 72x56
    (d / "broken.png").write_bytes(b"not an image")
    return d


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_report_matches_independent_metrics(micro_vae, folder, no_weights, tmp_path):
    out = tmp_path / "report"
    r = ka.evaluate(micro_vae, folder, out, progress=False)
    data = json.loads((out / "metrics.json").read_text())
    assert data["n_images"] == 3 and len(data["skipped"]) == 1 and "broken.png" in data["skipped"][0]
    for key in ("psnr", "ssim", "psnr_bicubic_f8", "psnr_bicubic_f4", "latent_bpp_fp16", "png_bpp", "jpeg90_bpp", "jpeg90_psnr"):
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    assert (out / "metrics.md").is_file() and Image.open(out / "grid.png").size[0] > 3 * 72

    psnrs, ssims, f8, f4, jpg_psnr = [], [], [], [], []
    for row in data["per_image"]:
        img = Image.open(row["file"]).convert("RGB")
        crop = img.crop((1, 2, 73, 58))  # centre crop of 75x61 to 72x56
        assert (row["width"], row["height"]) == (72, 56)
        orig = np.asarray(crop)
        rec = tensor_to_uint8(ka.reconstruct(micro_vae, pil_to_tensor(crop)[None]))[0]  # same model, same crop
        psnrs.append(_psnr_numpy(orig, rec))
        ssims.append(_ssim_skimage(orig, rec))
        for k, acc in ((8, f8), (4, f4)):
            small = crop.resize((72 // k, 56 // k), Image.BICUBIC)
            acc.append(_psnr_numpy(orig, np.asarray(small.resize((72, 56), Image.BICUBIC))))
        import io

        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        jpg_psnr.append(_psnr_numpy(orig, np.asarray(Image.open(buf).convert("RGB"))))
        assert row["latent_bpp_fp16"] == pytest.approx(4 * 7 * 9 * 16 / (72 * 56))  # 4 x 7 x 9 latent values, 16 bits
    assert data["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert data["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert data["psnr_bicubic_f8"] == pytest.approx(np.mean(f8), abs=1e-4)
    assert data["psnr_bicubic_f4"] == pytest.approx(np.mean(f4), abs=1e-4)
    assert data["jpeg90_psnr"] == pytest.approx(np.mean(jpg_psnr), abs=1e-4)
    assert data["psnr_bicubic_f4"] > data["psnr_bicubic_f8"]
    assert r["psnr"] == data["psnr"]


def test_missing_weights_reported_unavailable(micro_vae, folder, no_weights, tmp_path):
    out = tmp_path / "report"
    data = ev.evaluate(micro_vae, folder, out, limit=3, compression=False, progress=False)
    assert data["lpips"] is None and data["rfid"] is None
    for key, fname in (("lpips", lpips.LPIPS_BACKBONE_FILES["vgg"]), ("rfid", fid.INCEPTION_FILE)):
        info = data["availability"][key]
        assert info["available"] is False
        assert info["file"] == str(no_weights / "hub" / "checkpoints" / fname)
        assert fname in info["reason"]
    md = (out / "metrics.md").read_text()
    assert "Unavailable metrics" in md and fid.INCEPTION_FILE in md
    assert data["n_images"] == 2 and math.isfinite(data["psnr"]) and (out / "grid.png").is_file()


def test_size_crops_square_and_cli(micro_vae, folder, no_weights, tmp_path, monkeypatch):
    from kl_autoencoder import cli

    from kl_autoencoder.utils.images import fit_crop

    crop = fit_crop(Image.new("RGB", (100, 60)), 32)
    assert crop.size == (32, 32)
    monkeypatch.setattr(cli.common, "resolve_model", lambda spec, **kw: micro_vae)
    out = tmp_path / "cli"
    assert cli.main(["eval", "micro", str(folder), "--output", str(out), "--size", "32", "--limit", "3", "--no-compression"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["n_images"] == 2 and all((r["width"], r["height"]) == (32, 32) for r in data["per_image"])
    assert "png_bpp" not in data


def test_latent_stats_match_encoder(micro_vae, folder, no_weights, tmp_path):
    data = ev.evaluate(micro_vae, folder, tmp_path / "r", compression=False, progress=False)
    zs = []
    for row in data["per_image"]:
        crop = Image.open(row["file"]).convert("RGB").crop((1, 2, 73, 58))
        mean, _ = ka.encode_moments(micro_vae, pil_to_tensor(crop)[None])
        zs.append(mean.flatten())
    z = torch.cat(zs).double()
    st = data["latent_stats"]
    assert st["mean"] == pytest.approx(float(z.mean()), rel=1e-6)
    assert st["std"] == pytest.approx(float(z.std(unbiased=False)), rel=1e-6)
    assert st["suggested_scaling_factor"] == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-6)
