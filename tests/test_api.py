import numpy as np
import pytest
import torch

import kl_autoencoder as ka


def _x(b=2, h=32, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_is_normalised_posterior_mean(micro_vae):
    x = _x()
    z = ka.encode(micro_vae, x)
    assert z.shape == (2, 4, 4, 6)
    with torch.no_grad():
        mean = micro_vae.encode(x).latent_dist.mean  # diffusers' own path
    torch.testing.assert_close(z, mean * micro_vae.config.scaling_factor)


def test_shift_factor_is_subtracted_before_scaling(micro_vae_c16):
    x = _x(1)
    z = ka.encode(micro_vae_c16, x)
    with torch.no_grad():
        mean = micro_vae_c16.encode(x).latent_dist.mean
    torch.testing.assert_close(z, (mean - 0.1) * 1.5)
    with torch.no_grad():
        ref = micro_vae_c16.decode(z / 1.5 + 0.1).sample
    torch.testing.assert_close(ka.decode(micro_vae_c16, z), ref)


def test_decode_matches_diffusers(micro_vae):
    z = torch.randn(2, 4, 5, 3)
    with torch.no_grad():
        ref = micro_vae.decode(z / micro_vae.config.scaling_factor).sample
    out = ka.decode(micro_vae, z)
    assert out.shape == (2, 3, 40, 24)
    torch.testing.assert_close(out, ref)


def test_sample_needs_generator_and_is_reproducible(micro_vae):
    x = _x()
    with pytest.raises(ValueError, match="generator"):
        ka.encode(micro_vae, x, sample=True)
    a = ka.encode(micro_vae, x, sample=True, generator=torch.Generator().manual_seed(3))
    b = ka.encode(micro_vae, x, sample=True, generator=3)
    c = ka.encode(micro_vae, x, sample=True, generator=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    mean = ka.encode(micro_vae, x)
    assert not torch.allclose(a, mean)
    # the sample is mean + std * eps with eps ~ N(0, 1): check the standardised residual
    with torch.no_grad():
        dist = micro_vae.encode(x).latent_dist
    eps = (a / micro_vae.config.scaling_factor - dist.mean) / dist.std
    assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1) < 0.2


def test_odd_sizes_pad_and_crop_back(micro_vae):
    x = _x(1, 37, 50)
    z = ka.encode(micro_vae, x)
    assert z.shape == (1, 4, 5, 7)  # ceil(37/8), ceil(50/8)
    rec = ka.reconstruct(micro_vae, x)
    assert rec.shape == x.shape
    # padding is only on the bottom/right: the top-left block matches an unpadded run's content
    with pytest.raises(ValueError, match="not a multiple of 8"):
        ka.encode(micro_vae, x, pad=None)


def test_input_kinds_agree(micro_vae, photos):
    img = photos[0]
    arr = np.asarray(img)
    as_float = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    ref = ka.encode(micro_vae, as_float)
    torch.testing.assert_close(ka.encode(micro_vae, img), ref)
    torch.testing.assert_close(ka.encode(micro_vae, arr), ref)
    torch.testing.assert_close(ka.encode(micro_vae, torch.from_numpy(arr.copy())), ref)
    torch.testing.assert_close(ka.encode(micro_vae, [img, img]), torch.cat([ref, ref]))


def test_to_uint8_and_pil_round_trip(photos):
    arr = np.asarray(photos[1])
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert np.array_equal(ka.to_uint8(x), arr)
    assert np.array_equal(np.asarray(ka.to_pil(x)[0]), arr)


def test_bad_inputs_give_clear_errors(micro_vae):
    with pytest.raises(ValueError, match="3 channels"):
        ka.encode(micro_vae, torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="has 3 channels, this VAE's latents have 4"):
        ka.decode(micro_vae, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="non-finite"):
        ka.decode(micro_vae, torch.full((1, 4, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        ka.decode(micro_vae, torch.zeros(4, 4))
    with pytest.raises(TypeError, match="float"):
        ka.decode(micro_vae, torch.zeros(1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="float in \\[-1, 1\\] or uint8"):
        ka.encode(micro_vae, torch.zeros(1, 3, 8, 8, dtype=torch.int32))


def test_psnr_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    expected = 10 * np.log10(255**2 / mse)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert ka.psnr(ta, tb) == pytest.approx(expected, abs=1e-6)
