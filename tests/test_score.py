"""Anomaly scores: the KL and the likelihood match independent computations; corrupted photos rank above
their clean originals (per corruption, with the score that detects it); the CLI lists bad files.
Also the eval report's compression figures (issue 9) against independently saved PNG/JPEG files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageFilter
from scipy.stats import norm

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.config import load_config
from kl_autoencoder.utils.images import pil_to_tensor
from kl_autoencoder.evaluation.anomaly import discretized_gaussian_bits, score_images, sort_rows
from kl_autoencoder.training.trainer import train

from conftest import sample_photos


def test_kl_part_matches_closed_form_and_bpd_finite(micro_vae_c16, photos):
    flat = Image.new("RGB", (64, 64), (255, 255, 255))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    x = torch.stack([pil_to_tensor(im) for im in [*photos, flat, noise]])
    e = ka.elbo_bits_per_dim(micro_vae_c16, x)
    mean, logvar = ka.encode_moments(micro_vae_c16, x)
    q = torch.distributions.Normal(mean.double(), torch.exp(0.5 * logvar.double()))
    p = torch.distributions.Normal(torch.zeros_like(mean, dtype=torch.float64), 1.0)
    kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1) / math.log(2) / (3 * 64 * 64)
    torch.testing.assert_close(e["kl_bpd"], kl, rtol=1e-9, atol=1e-12)
    assert bool(torch.isfinite(e["bpd"]).all()) and bool((e["bpd"] > 0).all()) and bool((e["rec_bpd"] > 0).all())
    torch.testing.assert_close(e["bpd"], e["rec_bpd"] + e["kl_bpd"])
    again = ka.elbo_bits_per_dim(micro_vae_c16, x[2:4])  # one posterior draw per image: batch-independent
    torch.testing.assert_close(again["bpd"], e["bpd"][2:4], rtol=1e-6, atol=1e-9)


def test_discretized_gaussian_matches_scipy_and_normalises():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values of an 8-bit pixel in [-1, 1]
    for mu, sigma in ((0.3, 0.1), (-0.95, 0.05), (0.999, 0.4)):
        bits = torch.stack([discretized_gaussian_bits(v.view(1, 1, 1, 1), torch.tensor(mu, dtype=torch.float64).view(1, 1, 1, 1), sigma) for v in levels])[:, 0]
        mass = 2.0 ** (-bits)
        assert float(mass.sum()) == pytest.approx(1.0, abs=1e-9)  # a probability over the 256 values
        v = levels.numpy()
        a, b = (v - mu - 1 / 255) / sigma, (v - mu + 1 / 255) / sigma
        a[v <= -1 + 1e-9], b[v >= 1 - 1e-9] = -np.inf, np.inf  # edge bins reach to -inf / +inf
        upper = a > 0  # upper tail: survival functions, where 1 - cdf would lose the digits
        p = np.where(upper, norm.sf(a) - norm.sf(b), norm.cdf(b) - norm.cdf(a))
        ok = p > 1e-300
        np.testing.assert_allclose(bits.numpy()[ok], -np.log2(p[ok]), rtol=1e-7)
    far = discretized_gaussian_bits(torch.ones(1, 1, 1, 1) * -0.5, torch.ones(1, 1, 1, 1) * 0.9, 0.01)  # 140 sigma out
    assert math.isfinite(float(far)) and float(far) > 1000


# ----------------------------------------------------------------------------- ranking, with a model trained here

MICRO = {
    "model": {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
              "sample_size": 32, "scaling_factor": 1.0},
    "loss": {"perceptual": "none", "kl_weight": 1.0e-6, "disc_start": 100000},
    "train": {"lr": 3.0e-3, "scale_lr": False, "batch_size": 4, "num_workers": 0, "max_steps": 40, "log_every": 1000,
              "image_every": 100000, "eval_every": 100000, "checkpoint_every": 100000},
    "data": {"crop_size": 32},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score_train")
    data = tmp / "photos"
    data.mkdir()
    for i, im in enumerate(sample_photos(None)):
        im.resize((im.width // 4, im.height // 4), Image.BICUBIC).save(data / f"p{i}.png")
    (tmp / "micro.yaml").write_text(yaml.safe_dump(MICRO))
    train(load_config(tmp / "micro.yaml"), data, tmp / "run")
    return ka.load(tmp / "run" / "export")


def _test_photos(size: int = 96) -> list[Image.Image]:
    """8 real photos: each scikit-image sample as a whole square and as a zoomed crop."""
    out = []
    for im in sample_photos(None):
        q = min(im.size)
        sq = im.crop(((im.width - q) // 2, (im.height - q) // 2, (im.width - q) // 2 + q, (im.height - q) // 2 + q))
        out.append(sq.resize((size, size), Image.BICUBIC))
        big = sq.resize((2 * size, 2 * size), Image.BICUBIC)
        out.append(big.crop((size // 2, size // 3, size // 2 + size, size // 3 + size)))
    return out


def _noise(im: Image.Image, rng) -> Image.Image:
    a = np.asarray(im).astype(np.float64) + rng.normal(0, 40, (im.height, im.width, 3))  # std 40 of 255
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _blur(im: Image.Image, rng) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(2))


def _shuffle(im: Image.Image, rng, p: int = 32) -> Image.Image:
    a = np.asarray(im)
    n = im.width // p
    tiles = [a[i * p:(i + 1) * p, j * p:(j + 1) * p] for i in range(n) for j in range(n)]
    perm = rng.permutation(len(tiles))
    while (perm == np.arange(len(tiles))).any():  # every patch moves
        perm = rng.permutation(len(tiles))
    return Image.fromarray(np.concatenate([np.concatenate([tiles[perm[i * n + j]] for j in range(n)], 1) for i in range(n)], 0))


def test_corrupted_photos_rank_above_their_originals(trained, capsys):
    clean = _test_photos()
    rng = np.random.default_rng(0)
    corrupt = {name: [f(im, rng) for im in clean] for name, f in (("noise", _noise), ("blur", _blur), ("shuffle", _shuffle))}
    # sigma matched to this model's reconstruction error on clean photos (the module docstring's advice)
    first = score_images(trained, clean, progress=False)
    sigma = 2 * math.sqrt(np.mean([r["mse"] for r in first.rows]))  # RMS error, pixels in [-1, 1]
    base = score_images(trained, clean, sigma=sigma, progress=False).rows
    rates = {}
    for name, images in corrupt.items():
        rows = score_images(trained, images, sigma=sigma, progress=False).rows
        rates[name] = {k: float(np.mean([c[k] > b[k] for b, c in zip(base, rows)])) for k in ("score", "bpd", "kl_bpd", "png_bpd", "mse", "l1")}
    with capsys.disabled():
        print(f"\nsigma {sigma:.3f}; fraction of pairs ranked corrupted > clean: {json.dumps(rates)}")
    for k in ("mse", "l1"):
        assert rates["noise"][k] >= 0.9, ("noise", k, rates)
    assert rates["blur"]["score"] >= 0.9, rates  # complexity-corrected: blur is EASIER to reconstruct (mse falls)
    assert rates["blur"]["mse"] <= 0.1, rates  # ... which is why plain reconstruction error cannot be the default
    assert rates["shuffle"]["png_bpd"] >= 0.9, rates


def test_cli_csv_sorted_worst_first_bad_files_listed(micro_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    monkeypatch.setattr(cli.common, "resolve_model", lambda spec, **kw: micro_vae)
    d = tmp_path / "data"
    d.mkdir()
    photos = sample_photos(32)
    for i, im in enumerate(photos):
        im.save(d / f"p{i}.png")
    _noise(photos[0], np.random.default_rng(1)).save(d / "noisy.png")
    (d / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "scores.csv"
    assert cli.main(["score", "micro", str(d), "--output", str(out), "--batch-size", "3", "--sort", "mse"]) == 0
    notes = json.loads((tmp_path / "scores.json").read_text())  # settings and notes: a sidecar, the CSV stays plain
    assert not notes["lpips"]["available"] and "vgg16-397923af.pth" in notes["lpips"]["reason"]
    assert "discretized Gaussian" in notes["decoder_likelihood"]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))  # the header is the first line
    good, bad = [r for r in rows if not r["error"]], [r for r in rows if r["error"]]
    assert len(good) == 5 and len(bad) == 1 and bad[0]["file"].endswith("broken.jpg")
    mse = [float(r["mse"]) for r in good]
    assert mse == sorted(mse, reverse=True)
    assert all(r["lpips"] == "" and math.isfinite(float(r["bpd"])) for r in good)
    # independent check of one row: mse of the posterior-mean reconstruction, pixels in [0, 1]
    x = pil_to_tensor(Image.open(d / "p2.png").convert("RGB"))[None]
    ref = float((((ka.reconstruct(micro_vae, x) - x) / 2) ** 2).mean())
    row = next(r for r in good if r["file"].endswith("p2.png"))
    assert float(row["mse"]) == pytest.approx(ref, rel=1e-4)
    assert [r["file"] for r in sort_rows([{"file": "a", "score": 1.0}, {"file": "b", "score": 3.0}])] == ["b", "a"]


def test_eval_compression_figures_match_saved_files(micro_vae, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    d = tmp_path / "imgs"
    d.mkdir()
    crops = [im.crop((0, 0, 48, 40)) for im in sample_photos(None)[:2]]
    for i, im in enumerate(crops):
        im.save(d / f"p{i}.png")
    data = ka.evaluate(micro_vae, d, tmp_path / "report", progress=False)
    png, jpg = [], []
    for i, im in enumerate(crops):
        im.save(tmp_path / f"c{i}.png")  # Pillow defaults, as the report
        im.save(tmp_path / f"c{i}.jpg", quality=90)
        png.append((tmp_path / f"c{i}.png").stat().st_size * 8 / (48 * 40))
        jpg.append((tmp_path / f"c{i}.jpg").stat().st_size * 8 / (48 * 40))
    assert data["png_bpp"] == pytest.approx(np.mean(png), rel=1e-9)
    assert data["jpeg90_bpp"] == pytest.approx(np.mean(jpg), rel=1e-9)
    assert data["latent_bpp_fp16"] == pytest.approx(4 * 5 * 6 * 16 / (48 * 40))
    assert data["source_bpp"] == pytest.approx(np.mean(png), rel=1e-9)  # the sources are those PNGs
    assert abs(data["psnr_latent_fp16"] - data["psnr"]) < 0.5 and data["jpeg90_psnr"] > data["psnr"]
