"""Exact tiling: tiled encode/decode equal diffusers' untiled Encoder/Decoder forward (tiling.py)."""

from __future__ import annotations

import pytest
import torch

import kl_autoencoder as ka
from kl_autoencoder.inference import memory_plan, tiling
from kl_autoencoder.inference.memory_plan import tiling_plan
from kl_autoencoder.inference.tiling import tiled_decode, tiled_encode_moments

from conftest import perturb

TOL = 1e-3  # the bar for images in [-1, 1], fp32


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth + noise, in [-1, 1]: more like a photo than white noise, still non-trivial statistics
    low = torch.rand(b, 3, h // 8 + 1, w // 8 + 1, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 1.6 - 0.8 + 0.2 * torch.rand(b, 3, h, w, generator=g)).clamp(-1, 1)


@torch.no_grad()
def _untiled_moments(vae, x):
    m = vae.quant_conv(vae.encoder(x)) if vae.quant_conv is not None else vae.encoder(x)
    mean, logvar = m.chunk(2, dim=1)
    return mean, logvar.clamp(-30, 20)


@torch.no_grad()
def _untiled_decode(vae, z):
    return vae.decoder(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)


@pytest.fixture(scope="module")
def tiny_vae():
    return perturb(ka.create("tiny-kl-f8"))


@pytest.mark.parametrize("b,h,w,tile", [(1, 256, 256, 64), (2, 200, 152, 64), (1, 80, 160, 32)])
def test_micro_encode_decode_match_untiled(micro_vae, b, h, w, tile):
    x = _images(b, h, w)
    mean, logvar = tiled_encode_moments(micro_vae, x, tile)
    ref_mean, ref_logvar = _untiled_moments(micro_vae, x)
    assert mean.shape == (b, 4, h // 8, w // 8)
    torch.testing.assert_close(mean, ref_mean, atol=TOL, rtol=0)
    torch.testing.assert_close(logvar, ref_logvar, atol=TOL, rtol=0)
    out = tiled_decode(micro_vae, ref_mean, tile)
    ref = _untiled_decode(micro_vae, ref_mean)
    assert out.shape == (b, 3, h, w)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_tiny_preset_batch2_odd_size(tiny_vae):
    x = _images(2, 136, 104, seed=3)  # 17x13 latent: no size is a multiple of the tile
    mean, logvar = tiled_encode_moments(tiny_vae, x, 48)
    ref_mean, ref_logvar = _untiled_moments(tiny_vae, x)
    torch.testing.assert_close(mean, ref_mean, atol=TOL, rtol=0)
    torch.testing.assert_close(logvar, ref_logvar, atol=TOL, rtol=0)
    out = tiled_decode(tiny_vae, ref_mean, 48)
    torch.testing.assert_close(out, _untiled_decode(tiny_vae, ref_mean), atol=TOL, rtol=0)


def test_attention_chunks_and_c16_without_quant_convs(micro_vae_c16, monkeypatch):
    monkeypatch.setattr(tiling, "ATTENTION_CHUNK", 37)  # 16x12 = 192 latent tokens: 6 uneven chunks
    x = _images(1, 128, 96, seed=5)
    mean, _ = tiled_encode_moments(micro_vae_c16, x, 32)
    ref_mean, _ = _untiled_moments(micro_vae_c16, x)
    torch.testing.assert_close(mean, ref_mean, atol=TOL, rtol=0)
    out = tiled_decode(micro_vae_c16, ref_mean, 32)
    torch.testing.assert_close(out, _untiled_decode(micro_vae_c16, ref_mean), atol=TOL, rtol=0)


def test_per_tile_statistics_would_fail_the_bar(micro_vae):
    """Control: the comparison can fail. diffusers' tiling (per-tile GroupNorm) misses the bar on the same input."""
    x = _images(1, 96, 96, seed=7)
    vae = micro_vae
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    with torch.no_grad():
        theirs = vae.encode(x).latent_dist.mean
    vae.disable_tiling()
    ref, _ = _untiled_moments(vae, x)
    ours, _ = tiled_encode_moments(vae, x, 64)
    assert (theirs - ref).abs().max() > TOL
    assert (ours - ref).abs().max() <= TOL


def test_api_dispatch_always_equals_never(micro_vae):
    x = _images(2, 72, 88, seed=2)  # 72x88 is a multiple of 8; reconstruct crops nothing
    z_never = ka.encode(micro_vae, x, tiling="never")
    z_always = ka.encode(micro_vae, x, tiling="always", tile_size=32)
    torch.testing.assert_close(z_always, z_never, atol=TOL, rtol=0)
    torch.testing.assert_close(
        ka.decode(micro_vae, z_never, tiling="always", tile_size=32), ka.decode(micro_vae, z_never, tiling="never"), atol=TOL, rtol=0
    )
    rec = ka.reconstruct(micro_vae, x[:, :, :70, :85], tiling="always", tile_size=32)  # padded then cropped back
    assert rec.shape == (2, 3, 70, 85)
    torch.testing.assert_close(rec, ka.reconstruct(micro_vae, x[:, :, :70, :85], tiling="never"), atol=TOL, rtol=0)


def test_auto_tiles_when_memory_is_short(micro_vae, monkeypatch):
    x = _images(1, 64, 64)
    z = ka.encode(micro_vae, x, tiling="never")
    calls = []
    real = tiling.tiled_decode
    monkeypatch.setattr(tiling, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    ka.decode(micro_vae, z, tiling="auto")  # plenty of memory: untiled
    assert calls == []
    tiled = memory_plan.estimate_tiled_bytes(micro_vae, tuple(z.shape), "decode")
    monkeypatch.setattr(memory_plan, "available_memory", lambda device="cpu": int(tiled / memory_plan.AUTO_MEMORY_FRACTION))
    out = ka.decode(micro_vae, z, tiling="auto", tile_size=32)
    assert calls == [1]
    ref = ka.decode(micro_vae, z, tiling="never")
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    # not even exact tiling fits: approximate tiling, with a warning (exact here: a 64 px image is its own preview)
    monkeypatch.setattr(memory_plan, "available_memory", lambda device="cpu": 1000)
    with pytest.warns(UserWarning, match="tiling='approx'"):
        out = ka.decode(micro_vae, z, tiling="auto", tile_size=32)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_plan_slices_batches_before_tiling(micro_vae):
    one = memory_plan.estimate_untiled_bytes(micro_vae, (1, 3, 512, 512), "encode")
    four = memory_plan.estimate_untiled_bytes(micro_vae, (4, 3, 512, 512), "encode")
    assert four > 3 * one > 0
    shape = (4, 3, 512, 512)
    assert tiling_plan(micro_vae, shape, "encode", "auto", budget=four) == "whole"
    assert tiling_plan(micro_vae, shape, "encode", "auto", budget=one) == "slices"
    assert tiling_plan(micro_vae, shape, "encode", "auto", budget=one - 1) == "tiles"
    tiled = memory_plan.estimate_tiled_bytes(micro_vae, shape, "encode")
    assert tiled < one  # exact tiling needs less than an untiled pass, but grows with the image
    assert tiled < memory_plan.estimate_tiled_bytes(micro_vae, (1, 3, 1024, 1024), "encode")
    assert tiling_plan(micro_vae, shape, "encode", "auto", budget=tiled) == "tiles"
    assert tiling_plan(micro_vae, shape, "encode", "auto", budget=tiled - 1) == "approx"
    assert tiling_plan(micro_vae, shape, "encode", "approx", budget=10**15) == "approx"
    assert tiling_plan(micro_vae, shape, "encode", "never", budget=1) == "whole"
    assert tiling_plan(micro_vae, (1, 4, 8, 8), "decode", "always") == "tiles"
    # a decode of 64x64 latents is an encode of 512x512 images: the same estimate
    assert memory_plan.estimate_untiled_bytes(micro_vae, (1, 4, 64, 64), "decode") == one


def test_bad_arguments(micro_vae):
    x = _images(1, 64, 64)
    with pytest.raises(ValueError, match="tile_size=100"):
        tiled_encode_moments(micro_vae, x, 100)
    with pytest.raises(ValueError, match="tiling='sometimes'"):
        ka.encode(micro_vae, x, tiling="sometimes")
