import pytest
import torch

import kl_autoencoder as ka

SD_VAE_PARAMS = 83_653_863  # the SD 1.x/2.x VAE (CompVis kl-f8), as published


def test_sd_preset_has_sd_vae_parameter_count():
    vae = ka.create("sd-kl-f8")
    assert sum(p.numel() for p in vae.parameters()) == SD_VAE_PARAMS
    assert vae.config.latent_channels == 4 and vae.quant_conv is not None and vae.post_quant_conv is not None


def test_c16_preset_layout():
    vae = ka.create("kl-f8c16")
    assert vae.config.latent_channels == 16
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert vae.config.shift_factor is not None and vae.config.shift_factor != 0


def test_tiny_preset_fits_cpu_budget():
    cfg = ka.load_config("tiny-kl-f8")
    vae = ka.create(cfg)
    assert sum(p.numel() for p in vae.parameters()) <= 6_000_000
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4  # f8c4
    assert cfg.data.crop_size == 128


def test_create_is_seeded():
    a, b = ka.create("tiny-kl-f8"), ka.create("tiny-kl-f8")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    c = ka.create("tiny-kl-f8", seed=1)
    assert not torch.equal(a.decoder.conv_out.weight, c.decoder.conv_out.weight)


@pytest.mark.slow
def test_sd_preset_512_round_trip_shapes():
    vae = ka.create("sd-kl-f8")
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    z = ka.encode(vae, x)
    assert z.shape == (1, 4, 64, 64)
    y = ka.decode(vae, z)
    assert y.shape == (1, 3, 512, 512) and torch.isfinite(y).all()
