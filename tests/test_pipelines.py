"""An exported VAE runs inside diffusers pipelines assembled offline from tiny random parts."""

import torch
from diffusers import AutoencoderKL

import kl_autoencoder as ka
from kl_autoencoder.pipelines import tiny_dit_pipeline


def test_dit_pipeline_runs_in_our_latent_space(micro_vae, tmp_path):
    ka.export(micro_vae, tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", local_files_only=True)
    pipe = tiny_dit_pipeline(vae, image_size=64)
    seen = []
    vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    out = pipe(class_labels=[1, 3], num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 64, 64, 3)
    assert seen == [torch.Size([2, 4, 8, 8])]  # the denoiser's output went through our decoder


def test_stable_diffusion_pipeline_runs_in_our_latent_space(micro_vae, tmp_path):
    from sd_pipeline_utils import build_tiny_sd_pipeline

    ka.export(micro_vae, tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", local_files_only=True)
    pipe = build_tiny_sd_pipeline(vae, tmp_path)
    seen = []
    vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    out = pipe("a photo", height=64, width=96, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 96, 3)
    assert seen == [torch.Size([1, 4, 8, 12])]
