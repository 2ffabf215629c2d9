"""Approximate low-memory tiling (tiling_approx.py): exact where its approximations vanish, bounded
work per tile, and closer to the untiled pass than diffusers' enable_tiling where they do not."""

from __future__ import annotations

import pytest
import torch

import kl_autoencoder as ka
from kl_autoencoder.inference.tiling_approx import approx_decode, approx_encode_moments, mosaic

from conftest import sample_photos
from test_tiling import _images, _untiled_decode, _untiled_moments

TOL = 1e-4  # fp32 rounding only: the statistics are the image's own and every tile sees the whole image


@pytest.mark.parametrize("tile,halo,fast", [(64, 0, False), (16, 64, False), (16, 64, True)])
def test_exact_when_preview_is_the_image_and_halo_covers_it(micro_vae, tile, halo, fast):
    # 64x48 image <= preview: statistics of the image itself. tile 64: one tile; tile 16 + halo 64:
    # 12 tiles each running on the whole image, cropped back (the write-back is what is tested).
    # fast: fastconv's fused ResnetBlock2D must still go through the (patched) GroupNorm modules
    if fast:
        ka.optimize_inference(micro_vae)
    x = _images(2, 64, 48, seed=1)
    mean, logvar = approx_encode_moments(micro_vae, x, tile, halo=halo, preview=64)
    ref_mean, ref_logvar = _untiled_moments(micro_vae, x)
    torch.testing.assert_close(mean, ref_mean, atol=TOL, rtol=0)
    torch.testing.assert_close(logvar, ref_logvar, atol=TOL, rtol=0)
    out = approx_decode(micro_vae, ref_mean, tile, halo=halo, preview=64)
    torch.testing.assert_close(out, _untiled_decode(micro_vae, ref_mean), atol=TOL, rtol=0)


def test_group_norms_restored(micro_vae):
    z = torch.randn(1, 4, 8, 8)
    approx_decode(micro_vae, z, 32, halo=8, preview=32)
    norms = [m for m in micro_vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all("forward" not in vars(m) for m in norms)


def test_mosaic_odd_sizes_stay_rectangular():
    for n in (70, 99, 131):
        m = mosaic(torch.zeros(1, 2, n, n + 5), 32, 1)
        assert m.shape == (1, 2, 32, 32)


def test_mosaic_is_full_resolution_crops():
    x = torch.arange(40 * 56, dtype=torch.float32).view(1, 1, 40, 56)
    assert torch.equal(mosaic(x, 64, 8), x)  # small: the image itself
    m = mosaic(torch.arange(200 * 160.0).view(1, 1, 200, 160), 64, 8)
    assert m.shape[-2:] == (64, 64)
    full = torch.arange(200 * 160.0).view(200, 160)
    # every 16x16 block is a contiguous crop of the image: unit steps along rows and columns
    for r in range(0, 64, 16):
        for c in range(0, 64, 16):
            b = m[0, 0, r : r + 16, c : c + 16]
            r0, c0 = divmod(int(b[0, 0]), 160)
            assert r0 % 8 == 0 and c0 % 8 == 0
            torch.testing.assert_close(b, full[r0 : r0 + 16, c0 : c0 + 16])
    # spread over the image: the first crop at the top-left corner, the last at the bottom-right
    assert int(m[0, 0, 0, 0]) == 0 and int(m[0, 0, -1, -1]) == 200 * 160 - 1


def test_work_per_tile_does_not_grow_with_the_image(micro_vae):
    seen: list[tuple[int, int]] = []
    hook = micro_vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    try:
        for size in (16, 32):  # latents of 128 and 256 px images
            seen.clear()
            approx_decode(micro_vae, torch.randn(1, 4, size, size), 32, halo=16, preview=64)
            assert max(h * w for h, w in seen) <= (32 // 8 + 2 * 16 // 8) ** 2  # the preview is 8x8 latents
            assert len(seen) == 1 + (size * 8 // 32) ** 2  # one preview, then every tile once
    finally:
        hook.remove()


def test_closer_than_diffusers_tiling_on_a_photo(micro_vae):
    # a 256 px photo, preview 128: approximate statistics, 64 px tiles; diffusers' enable_tiling with the
    # same tile size, blending its tiles, is the usual alternative
    x = ka.utils.images.pil_to_tensor(sample_photos(256)[0])[None]
    ref_z, _ = _untiled_moments(micro_vae, x)
    ref = _untiled_decode(micro_vae, ref_z)
    ours = approx_decode(micro_vae, ref_z, 64, halo=16, preview=128)
    micro_vae.enable_tiling()
    micro_vae.tile_sample_min_size, micro_vae.tile_latent_min_size = 64, 8
    with torch.no_grad():
        theirs = micro_vae.decode(ref_z).sample
    micro_vae.disable_tiling()
    assert torch.isfinite(ours).all()
    err_ours, err_theirs = (ours - ref).abs().mean().item(), (theirs - ref).abs().mean().item()
    assert err_ours < err_theirs, (err_ours, err_theirs)


def test_api_accepts_approx(micro_vae):
    x = _images(1, 64, 64)
    z = ka.encode(micro_vae, x, tiling="approx", tile_size=32)
    assert z.shape == (1, 4, 8, 8)
    out = ka.decode(micro_vae, z, tiling="approx", tile_size=32)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of 8"):
        approx_decode(micro_vae, z, 32, halo=12)
