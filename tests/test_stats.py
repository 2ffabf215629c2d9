"""Scaling/shift factors: independent check of the formula, held-out unit variance, --write."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.latents.stats import compute_latent_stats

from conftest import sample_photos


def _crops(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n random size x size crops of the four sample photos, (n, 3, size, size) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(p.resize((p.width // 2, p.height // 2), Image.BICUBIC)) for p in sample_photos(None)]
    out = []
    for i in range(n):
        a = photos[i % 4]
        y, x = rng.integers(0, a.shape[0] - size), rng.integers(0, a.shape[1] - size)
        out.append(torch.from_numpy(a[y : y + size, x : x + size].copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_factor_formula_and_spread(micro_vae):
    x = _crops(16)
    batches = list(x.split(4))
    st = compute_latent_stats(micro_vae, batches, sample=False, shift=True)
    z = torch.cat([ka.encode_moments(micro_vae, b)[0] for b in batches]).double()  # (16, 4, 8, 8) raw means
    assert abs(st.scaling_factor - 1 / float(z.std(unbiased=False))) < 1e-6 * st.scaling_factor
    assert abs(st.shift_factor - float(z.mean())) < 1e-6
    assert (st.n_values, st.n_batches) == (z.numel(), 4)
    per = [1 / float(zb.std(unbiased=False)) for zb in z.split(4)]
    np.testing.assert_allclose(st.batch_scaling_factors, per, rtol=1e-6)
    assert abs(st.spread - float(np.std(per, ddof=1))) < 1e-9 and st.spread > 0
    assert compute_latent_stats(micro_vae, batches, sample=False, shift=False).shift_factor is None


def test_factor_gives_unit_std_on_held_out(micro_vae, tmp_path, capsys):
    fit, held_out = _crops(48, seed=1), _crops(48, seed=2)
    st = compute_latent_stats(micro_vae, fit.split(8), sample=True, seed=0)
    mean, logvar = ka.encode_moments(micro_vae, held_out)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    norm = (z - st.shift_factor) * st.scaling_factor
    assert abs(float(norm.std()) - 1.0) < 0.05, float(norm.std())
    assert abs(float(norm.mean())) < 0.05

    # the command: an image folder -> factors written into the model's config.json, used by ka.encode
    data = tmp_path / "data"
    data.mkdir()
    for i, im in enumerate(fit):
        Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(data / f"{i:02d}.png")
    model = tmp_path / "model"
    ka.export(micro_vae, model)
    args = ["stats", str(model), str(data), "--resolution", "64", "--batch-size", "8", "--num-workers", "0"]
    assert cli.main(args + ["--write"]) == 0
    assert "scaling_factor" in capsys.readouterr().out
    cfg = json.loads((model / "config.json").read_text())
    assert abs(cfg["scaling_factor"] - st.scaling_factor) < 0.01 * st.scaling_factor  # same crops, PNG-rounded
    vae = ka.load(model)
    lat = ka.encode(vae, held_out, sample=True, generator=5)  # normalised with the written factors
    assert abs(float(lat.std()) - 1.0) < 0.05
    assert cli.main(["stats", "tiny-kl-f8", str(data), "--write", "--limit", "2", "--num-workers", "0"]) == 2
    assert "needs a diffusers model folder" in capsys.readouterr().err
