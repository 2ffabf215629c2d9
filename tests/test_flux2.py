"""The FLUX.2 VAE (diffusers AutoencoderKLFlux2) end to end, on the tiny preset: normalisation as diffusers'
Flux2 pipeline computes it (its own helpers called here), exact tiling, fast convolutions, the latent cache
and LatentDataset, loading from folders, single files and hub ids, stats, eval and the other consumers."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.convert import ConversionError
from kl_autoencoder.inference import fastconv
from kl_autoencoder.latents.stats import stats_of_cache, write_factors
from kl_autoencoder.utils.images import pil_to_tensor

from conftest import perturb

Flux2Pipeline = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2").Flux2Pipeline


def random_bn(vae: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """BatchNorm running statistics away from the init (mean 0, var 1), as a trained FLUX.2 VAE has."""
    g = torch.Generator().manual_seed(seed)
    n = vae.bn.running_mean.numel()
    vae.bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
    return vae


@pytest.fixture(scope="module")
def _flux2():
    return random_bn(perturb(ka.create("tiny-kl-f8c32-flux2")))


@pytest.fixture
def flux2(_flux2):
    return copy.deepcopy(_flux2)


def pipeline_encode(vae, x):
    """diffusers' Flux2Pipeline._encode_vae_image (posterior mode, _patchify_latents, BatchNorm statistics), on a
    stand-in pipeline holding the VAE."""
    pipe = types.SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        return Flux2Pipeline._encode_vae_image(pipe, x, generator=None)


def pipeline_decode(vae, latents):
    """Flux2Pipeline.__call__'s decode step (pipeline_flux2.py l. 1019-1027) with its _unpatchify_latents helper."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        return vae.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]


def images(n: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    from conftest import sample_photos

    photos = [pil_to_tensor(p.resize((w, h))) for p in sample_photos(None)[:n]]
    return torch.stack(photos)  # (n, 3, h, w) real photos in [-1, 1]


def test_presets_are_flux2():
    """kl-f8c32-flux2 is the released architecture: diffusers' AutoencoderKLFlux2 defaults (FLUX.2-dev's config)."""
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
    vae = ka.create("kl-f8c32-flux2")
    assert type(vae) is AutoencoderKLFlux2
    skip = {"_use_default_values", "_class_name", "_diffusers_version"}
    assert {k: v for k, v in vae.config.items() if k not in skip} == {k: v for k, v in ref.config.items() if k not in skip}
    assert ka.num_parameters(vae) == sum(p.numel() for p in ref.parameters())
    tiny = ka.create("tiny-kl-f8c32-flux2")
    assert type(tiny) is AutoencoderKLFlux2 and ka.num_parameters(tiny) < 6_000_000 and tiny.config.latent_channels == 32


def test_normalised_latents_equal_the_flux2_pipeline(flux2):
    """Must-show 3: ka.encode == Flux2Pipeline._encode_vae_image; ka.decode == the pipeline's decode step."""
    x = images()
    ours = ka.encode(flux2, x, tiling="never")
    theirs = pipeline_encode(flux2, x)
    assert ours.shape == (2, 128, 4, 6)  # 4 x 32 channels at 1/16 of 64 x 96
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ka.decode(flux2, ours, tiling="never"), pipeline_decode(flux2, ours), rtol=0, atol=1e-5)
    odd = ka.encode(flux2, images(1, 72, 100), tiling="never")  # padded to 80 x 112: multiples of 16
    assert odd.shape == (1, 128, 5, 7)
    with pytest.raises(ValueError, match="has 32 channels, this VAE's latents have 128"):
        ka.decode(flux2, torch.zeros(1, 32, 4, 4))


def test_exact_tiling_matches_untiled(flux2):
    """Must-show 3: exact tiling <= 1e-3 from untiled, encode and decode."""
    x = images(1, 96, 128)
    untiled = ka.encode(flux2, x, tiling="never")
    tiled = ka.encode(flux2, x, tiling="always", tile_size=32)
    assert float((tiled - untiled).abs().max()) <= 1e-3
    dec_untiled = ka.decode(flux2, untiled, tiling="never")
    dec_tiled = ka.decode(flux2, untiled, tiling="always", tile_size=32)
    assert float((dec_tiled - dec_untiled).abs().max()) <= 1e-3


@pytest.mark.skipif(fastconv.winograd_library() is None and not fastconv.nnpack_available(), reason="no fast convolutions here")
@pytest.mark.parametrize("path", ["default", "winograd"])
def test_fast_convolutions_match_eager(flux2, path, monkeypatch):
    """Must-show 3: fast CPU convolutions <= 1e-4 from eager (NNPACK where the dispatch picks it; our Winograd
    F(6,3) on every eligible conv when NNPACK is hidden)."""
    if path == "winograd":
        if fastconv.winograd_library() is None:
            pytest.skip("no gcc/OpenMP to build the Winograd kernels")
        monkeypatch.setattr(fastconv, "nnpack_available", lambda: False)
    x = images(1, 64, 64)
    eager_z = ka.encode(flux2, x, tiling="never")
    eager_img = ka.decode(flux2, eager_z, tiling="never")
    fast = ka.optimize_inference(copy.deepcopy(flux2))
    assert fastconv.is_optimized(fast)
    assert float((ka.encode(fast, x, tiling="never") - eager_z).abs().max()) <= 1e-4
    assert float((ka.decode(fast, eager_z, tiling="never") - eager_img).abs().max()) <= 1e-4


def _data(tmp_path, n=2, size=64):
    from conftest import sample_photos

    data = tmp_path / "data"
    data.mkdir()
    for i, im in enumerate(sample_photos(size)[:n]):
        im.save(data / f"{i}.png")
    return data


def test_latent_cache_reads_back_through_latent_dataset(flux2, tmp_path):
    """Must-show 3: a FLUX.2 latent cache; LatentDataset gives the pipeline's normalised latents."""
    data = _data(tmp_path)
    out = ka.encode_dataset(flux2, data, tmp_path / "cache", resolution=64, num_workers=0, progress=False).out
    m = json.loads((out / "manifest.json").read_text())
    norm = m["latent_normalization"]
    assert norm["kind"] == "batchnorm" and norm["patch_size"] == [2, 2] and norm["batch_norm_eps"] == 1e-4
    assert norm["running_mean"] == flux2.bn.running_mean.tolist() and norm["running_var"] == flux2.bn.running_var.tolist()
    ds = ka.LatentDataset(out)
    for i, s in enumerate(ds.samples):
        x = pil_to_tensor(ka.load_image(data / s["path"]))[None]  # 64 x 64: the crop is the whole image
        item = ds[i]["latents"]
        assert item.shape == (128, 4, 4)
        torch.testing.assert_close(item, pipeline_encode(flux2, x)[0], rtol=0, atol=1e-4)  # batch of 2 vs 1: float32 sums
    assert ka.LatentDataset(out, sample=True)[0]["latents"].shape == (128, 4, 4)
    assert cli.main(["decode", str(tmp_path / "m"), str(out), str(tmp_path / "png")]) == 2  # no such model: one line
    folder = ka.export(flux2, tmp_path / "m")
    assert cli.main(["decode", str(folder), str(out), str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["0.png", "1.png"]


def test_load_folder_single_files_and_hub(flux2, tmp_path, monkeypatch):
    """FLUX.2 from a diffusers folder, a bare diffusers-layout file, an LDM-layout file, the original file's
    names (encoder.quant_conv / decoder.post_quant_conv, as ComfyUI renames them) and a hub id; strict."""
    from diffusers import AutoencoderKLFlux2

    from hub_cache import cache_repo, folder_files

    want = flux2.state_dict()

    def same(v):
        assert type(v) is AutoencoderKLFlux2 and tuple(v.config.patch_size) == (2, 2)
        got = v.state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    folder = ka.export(flux2, tmp_path / "f")
    same(ka.load(folder))
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    same(ka.load(bare))
    ldm = ka.export(flux2, tmp_path / "flux2-ldm.safetensors", format="ldm", allow_nonstandard=True)
    same(ka.load(ldm))
    sd = load_tensors(str(ldm))
    bfl = {("encoder." + k if k.startswith("quant_conv.") else "decoder." + k if k.startswith("post_quant_conv.") else k): v
           for k, v in sd.items() if k != "bn.num_batches_tracked"}  # a counter no computation reads
    save_file(bfl, str(tmp_path / "ae.safetensors"))
    same(ka.load(tmp_path / "ae.safetensors"))
    del bfl["bn.running_var"]
    save_file(bfl, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConversionError, match="1 missing key\\(s\\): bn.running_var"):
        ka.load(tmp_path / "broken.safetensors")

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache_repo(cache, "org/tiny-flux2", folder_files(folder, "vae/"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    same(ka.load("org/tiny-flux2", offline=True))


def test_ldm_export_refuses_flux2(flux2, tmp_path):
    with pytest.raises(ValueError, match="AutoencoderKLFlux2 .*their LDM loader builds SD's AutoencoderKL"):
        ka.export(flux2, tmp_path / "x.safetensors", format="ldm")
    assert not (tmp_path / "x.safetensors").exists()


def test_stats_measure_and_write_the_batchnorm(flux2, tmp_path):
    """stats over the patchified latents (checked with the pipeline's _patchify_latents); --write puts them in the
    BatchNorm buffers, after which the pipeline's own normalisation gives per-channel mean 0, std ~1."""
    data = _data(tmp_path, n=4)
    cache = ka.encode_dataset(flux2, data, tmp_path / "cache", resolution=64, num_workers=0, progress=False).out
    st = stats_of_cache(cache, sample=False)
    ds = ka.LatentDataset(cache)
    z = Flux2Pipeline._patchify_latents(torch.stack([ds.moments(i)[0] for i in range(len(ds))])).double()
    assert st.patch_size == (2, 2) and len(st.channel_mean) == 128
    torch.testing.assert_close(torch.tensor(st.channel_mean, dtype=torch.float64), z.mean(dim=(0, 2, 3)), rtol=1e-9, atol=1e-9)
    folder = ka.export(flux2, tmp_path / "f")
    written = write_factors(folder, st)
    assert written.name == "diffusion_pytorch_model.safetensors" and oct(written.stat().st_mode & 0o777) != "0o600"
    new = ka.load(folder)
    torch.testing.assert_close(new.bn.running_mean, torch.tensor(st.channel_mean, dtype=torch.float32))
    x = torch.stack([pil_to_tensor(ka.load_image(data / s["path"])) for s in ds.samples])
    lat = pipeline_encode(new, x)  # diffusers' normalisation with the written statistics
    torch.testing.assert_close(lat.mean(dim=(0, 2, 3)), torch.zeros(128), rtol=0, atol=1e-4)
    torch.testing.assert_close(lat.std(dim=(0, 2, 3), unbiased=False), torch.ones(128), rtol=0, atol=2e-2)  # eps 1e-4
    other = ka.export(ka.create(ka.config.ModelConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                                      latent_channels=32)), tmp_path / "kl")  # AutoencoderKL, 32 ch
    write_factors(other, st, per_channel=True)  # a plain VAE gets latents_mean/std instead
    assert len(json.loads((other / "config.json").read_text())["latents_mean"]) == 128


def test_eval_interpolate_score_and_swap_run(flux2, tmp_path):
    data = _data(tmp_path, n=2)
    r = ka.evaluate(flux2, data, tmp_path / "eval", progress=False, compression=False)
    model = r["settings"]["model"]
    assert model["class"] == "AutoencoderKLFlux2" and model["normalized_channels"] == 128 and r["psnr"] > 5
    strip = ka.interpolate(flux2, data / "0.png", data / "1.png", 3)
    assert strip.shape == (3, 3, 64, 64)
    scores = ka.score_images(flux2, data, progress=False)
    assert len(scores.rows) == 2
    x = images(2, 64, 64)
    report = ka.pipelines.swap.compare_vaes(flux2, copy.deepcopy(flux2), x)
    assert report.compatible and report.current["latent_channels"] == 128 and report.current["downsample"] == 16
    plain = ka.create(ka.config.ModelConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, latent_channels=32))
    assert "latent channels differ (128 vs 32)" in ka.pipelines.swap.compare_vaes(flux2, plain, x).problems[0]
