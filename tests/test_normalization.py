"""Latent normalisation of every family: per-channel latents_mean/std (Playground v2.5), the scalar rule,
caches (new and old manifests), and per-channel statistics. Checked against formulas written here and
against diffusers' own SDXL pipeline code."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.latents.stats import compute_latent_stats, write_factors
from kl_autoencoder.model import LatentNormalization, latent_normalization

from conftest import MICRO, perturb

# playgroundai/playground-v2.5-1024px-aesthetic vae/config.json (ComfyUI latent_formats.py SDXL_Playground_2_5)
PG_MEAN, PG_STD, PG_SCALE = [-1.6574, 1.886, -1.383, 2.5155], [8.4927, 5.9022, 6.5498, 5.2299], 0.5


@pytest.fixture
def pg_vae():
    return perturb(ka.create(dataclasses.replace(MICRO, scaling_factor=PG_SCALE, latents_mean=tuple(PG_MEAN),
                                                 latents_std=tuple(PG_STD))))


@pytest.fixture
def images(photos):
    return torch.stack([ka.utils.images.pil_to_tensor(p) for p in photos[:2]])  # (2, 3, 64, 64) in [-1, 1]


def _column(v):
    return torch.tensor(v).view(1, -1, 1, 1)


def test_per_channel_latents_equal_the_formula(pg_vae, images):
    """Must-show 2: latents = (z - latents_mean) * scaling_factor / latents_std, computed here from diffusers' encode."""
    with torch.no_grad():
        z = pg_vae.encode(images).latent_dist.mean  # (2, 4, 8, 8) raw, diffusers' own encode
    want = (z - _column(PG_MEAN)) * PG_SCALE / _column(PG_STD)
    got = ka.encode(pg_vae, images, tiling="never")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert latent_normalization(pg_vae).kind == "per-channel"
    assert abs(float(got.mean()) - float(((z - _column(PG_MEAN)) * PG_SCALE).mean())) > 1e-3  # the rule matters here


def test_per_channel_latents_equal_diffusers_sdxl_img2img_prepare_latents(pg_vae, images):
    """Must-show 2: diffusers' StableDiffusionXLImg2ImgPipeline.prepare_latents (pipeline_stable_diffusion_xl_img2img.py
    l. 696-749: posterior sample, then (z - latents_mean) * scaling_factor / latents_std), called as the pipeline
    calls it, on a stand-in pipeline holding only the VAE."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = types.SimpleNamespace(vae=pg_vae)
    with torch.no_grad():
        theirs = StableDiffusionXLImg2ImgPipeline.prepare_latents(
            pipe, images, None, 2, 1, torch.float32, torch.device("cpu"), generator=torch.Generator().manual_seed(7), add_noise=False)
    ours = ka.encode(pg_vae, images, sample=True, generator=torch.Generator().manual_seed(7), tiling="never")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_per_channel_decode_and_round_trip(pg_vae, images):
    """Must-show 2: decode inverts it as StableDiffusionXLPipeline does (latents * std / scale + mean); the round trip
    is that of the same weights without per-channel normalisation."""
    latents = ka.encode(pg_vae, images, tiling="never")
    with torch.no_grad():
        want = pg_vae.decode(latents * _column(PG_STD) / PG_SCALE + _column(PG_MEAN)).sample
    torch.testing.assert_close(ka.decode(pg_vae, latents, tiling="never"), want, rtol=0, atol=1e-5)
    plain = ka.create(MICRO)
    plain.load_state_dict(pg_vae.state_dict())
    torch.testing.assert_close(ka.reconstruct(pg_vae, images, tiling="never"), ka.reconstruct(plain, images, tiling="never"),
                               rtol=0, atol=5e-5)  # float32 rounding of (z - mean) / std and back; a wrong rule is O(1)
    norm = latent_normalization(pg_vae)
    z = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(0)) * 5
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z, rtol=1e-6, atol=1e-5)


def test_scalar_rule_is_unchanged(micro_vae_c16, images):
    with torch.no_grad():
        z = micro_vae_c16.encode(images).latent_dist.mean
    torch.testing.assert_close(ka.encode(micro_vae_c16, images, tiling="never"), (z - 0.1) * 1.5, rtol=1e-6, atol=1e-6)
    assert ka.model.model_summary(micro_vae_c16)["scaling_factor"] == 1.5


def _cache(vae, tmp_path, photos):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for i, im in enumerate(photos):
        im.save(data / f"{i}.png")
    return ka.encode_dataset(vae, data, tmp_path / "cache", resolution=64, num_workers=0, progress=False).out


def test_cache_records_the_rule_and_dataset_applies_it(pg_vae, tmp_path, photos):
    out = _cache(pg_vae, tmp_path, photos[:2])
    m = json.loads((out / "manifest.json").read_text())
    assert m["latent_normalization"] == {"kind": "per-channel", "scaling_factor": PG_SCALE, "latents_mean": PG_MEAN,
                                         "latents_std": PG_STD}
    ds = ka.LatentDataset(out)
    for i in range(len(ds)):
        mean = ds.moments(i)[0]  # stored raw posterior mean (C, h, w)
        want = (mean[None] - _column(PG_MEAN)) * PG_SCALE / _column(PG_STD)
        torch.testing.assert_close(ds[i]["latents"], want[0], rtol=1e-6, atol=1e-6)


def test_old_manifest_with_only_scalar_factors_still_reads(micro_vae_c16, tmp_path, photos):
    out = _cache(micro_vae_c16, tmp_path, photos[:2])
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    del m["latent_normalization"]  # as a cache written before issue 16
    path.write_text(json.dumps(m))
    ds = ka.LatentDataset(out)
    mean = ds.moments(0)[0]
    torch.testing.assert_close(ds[0]["latents"], (mean - 0.1) * 1.5)
    torch.testing.assert_close(ka.LatentDataset(out, scaling_factor=2.0)[0]["latents"], (mean - 0.1) * 2.0)
    assert (ds.scaling_factor, ds.shift_factor) == (1.5, 0.1)


def test_per_channel_stats_measure_and_write(micro_vae, images, tmp_path):
    """`stats` measures per-channel mean/std (checked against torch here) and writes latents_mean/latents_std;
    the model then normalises those images to per-channel mean 0, std 1."""
    st = compute_latent_stats(micro_vae, [images[:1], images[1:]], sample=False)
    with torch.no_grad():
        z = micro_vae.encode(images).latent_dist.mean.double()
    torch.testing.assert_close(torch.tensor(st.channel_mean, dtype=torch.float64), z.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)  # float32 encodes
    torch.testing.assert_close(torch.tensor(st.channel_std, dtype=torch.float64), z.std(dim=(0, 2, 3), unbiased=False),
                               rtol=1e-5, atol=1e-6)
    folder = ka.export(micro_vae, tmp_path / "m")
    write_factors(folder, st, per_channel=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["latents_mean"] == st.channel_mean and cfg["latents_std"] == st.channel_std and cfg["scaling_factor"] == 1.0
    lat = ka.encode(ka.load(folder), images, tiling="never")
    torch.testing.assert_close(lat.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(lat.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), rtol=0, atol=1e-5)
    write_factors(folder, st)  # back to scalar factors: the per-channel lists are cleared, else they would win
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["latents_mean"] is None and cfg["scaling_factor"] == st.scaling_factor


def test_cli_stats_per_channel_write(micro_vae, tmp_path, photos, capsys):
    folder = ka.export(micro_vae, tmp_path / "m")
    data = tmp_path / "d"
    data.mkdir()
    for i, im in enumerate(photos):
        im.save(data / f"{i}.png")
    rc = cli.main(["stats", str(folder), str(data), "--resolution", "64", "--per-channel", "--write", "--mode", "mean",
                   "--num-workers", "0"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.split("\nscaling_factor")[0])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["latents_mean"] == out["channel_mean"] and len(cfg["latents_std"]) == 4


def test_normalization_json_round_trip_and_bad_values():
    for norm in (LatentNormalization("scalar", 0.3611, 0.1159),
                 LatentNormalization("per-channel", 0.5, mean=tuple(PG_MEAN), std=tuple(PG_STD)),
                 LatentNormalization("batchnorm", mean=(0.1,) * 8, var=(2.0,) * 8, eps=1e-4, patch_size=(2, 2))):
        assert LatentNormalization.from_json(json.loads(json.dumps(norm.to_json()))) == norm
    with pytest.raises(ValueError, match="latents_std must be > 0"):
        LatentNormalization("per-channel", 1.0, mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="BatchNorm"):
        LatentNormalization("batchnorm", mean=(0.0,) * 8, var=(1.0,) * 8, eps=1e-4, patch_size=(2, 2)).with_factors(2.0)
