"""Swapping a pipeline's VAE: compatible fine-tunes swap and generate; unrelated latent spaces are refused."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file as read_safetensors

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.evaluation.samples import synthetic_images
from kl_autoencoder.pipelines.swap import IncompatibleVAEError, compare_vaes, swap_vae

from conftest import MICRO, perturb
from sd_pipeline_utils import build_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    pipe = build_tiny_sd_pipeline(perturb(ka.create(MICRO)), tmp)
    pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
    return tmp / "pipe"


def fine_tuned(vae: torch.nn.Module) -> torch.nn.Module:
    """Same encoder, a few decoder weights nudged (what a decoder-only fine-tune like sd-vae-ft-mse does)."""
    new = copy.deepcopy(vae)
    with torch.no_grad():
        new.decoder.conv_out.weight.mul_(1.05)
        new.decoder.up_blocks[0].resnets[0].conv1.weight.add_(0.01)
    return new


def test_fine_tuned_vae_swaps_and_pipeline_generates(pipe_dir, tmp_path, capsys):
    current = ka.load(pipe_dir / "vae")
    new = fine_tuned(current)
    vae_file = ka.export(new, tmp_path / "ft-vae.safetensors", format="ldm", allow_nonstandard=True)  # an LDM file, as users download them
    out = tmp_path / "swapped"
    assert cli.main(["swap", str(pipe_dir), str(vae_file), str(out), "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "latent channels" in printed and "current encoder -> new decoder" in printed and "verdict: compatible" in printed
    assert (out / "model_index.json").read_bytes() == (pipe_dir / "model_index.json").read_bytes()
    others = [f.relative_to(pipe_dir) for f in pipe_dir.rglob("*") if f.is_file() and not f.is_relative_to(pipe_dir / "vae")]
    assert len(others) >= 6 and any(f.parts[0] == "unet" for f in others)
    for rel in others:
        assert (out / rel).read_bytes() == (pipe_dir / rel).read_bytes(), rel
    swapped = read_safetensors(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(swapped[k], v) for k, v in new.state_dict().items())
    assert not torch.equal(swapped["decoder.conv_out.weight"], current.state_dict()["decoder.conv_out.weight"])

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight, new.decoder.conv_out.weight, rtol=0, atol=0)
    img = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and bool((img >= 0).all() and (img <= 1).all())


def test_report_measures_cross_reconstruction_independently(pipe_dir):
    current = ka.load(pipe_dir / "vae")
    new = fine_tuned(current)
    x = synthetic_images(2, 64)
    report = compare_vaes(current, new, x)
    # independent computation with plain diffusers calls: current encoder -> new decoder
    with torch.no_grad():
        latents = current.encode(x).latent_dist.mean * current.config.scaling_factor
        cross = new.decode(latents / new.config.scaling_factor).sample.clamp(-1, 1)
    assert report.psnr_cross == pytest.approx(ka.psnr(x, cross), abs=1e-6)
    assert report.latent_rel_error == 0.0  # the same encoder
    assert report.psnr_cross == report.psnr_new and report.compatible
    assert report.current["scaling_factor"] == report.new["scaling_factor"] == 0.5


def test_unrelated_latent_space_is_refused_unless_forced(pipe_dir, tmp_path, capsys):
    other = ka.export(perturb(ka.create(MICRO, seed=123), seed=7), tmp_path / "other")
    out = tmp_path / "swapped"
    assert cli.main(["swap", str(pipe_dir), str(other), str(out), "--size", "64"]) == 1
    printed = capsys.readouterr().out
    assert "INCOMPATIBLE" in printed and "latent spaces differ" in printed and "--force" in printed
    assert not out.exists()
    assert cli.main(["swap", str(pipe_dir), str(other), str(out), "--force", "--size", "64"]) == 0
    assert (out / "vae" / "config.json").is_file() and (out / "unet" / "config.json").is_file()


def test_different_latent_channels_refused_even_with_force(pipe_dir, tmp_path, capsys):
    c16 = ka.export(ka.create(dataclasses.replace(MICRO, latent_channels=16)), tmp_path / "c16")
    assert cli.main(["swap", str(pipe_dir), str(c16), str(tmp_path / "o"), "--force"]) == 1
    assert "latent channels differ (4 vs 16)" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_swap_on_a_pipeline_object(pipe_dir):
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, local_files_only=True)
    new = fine_tuned(pipe.vae)
    report = swap_vae(pipe, new, images=synthetic_images(2, 64))
    assert report.pipeline.vae is new and pipe.vae is not new and report.pipeline.unet is pipe.unet
    with pytest.raises(IncompatibleVAEError, match="latent spaces differ"):
        swap_vae(pipe, perturb(ka.create(MICRO, seed=5)), images=synthetic_images(2, 64))
