"""bf16 CPU path (inference/bf16.py + fastconv): oneDNN convs on channels_last, sub-pixel upsampling, the
fallback to fp32 where the CPU has no native bf16, and an end-to-end error no worse than diffusers' bf16."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import kl_autoencoder as ka
from kl_autoencoder.config import ModelConfig
from kl_autoencoder.evaluation.metrics import psnr
from kl_autoencoder.inference import bf16, fastconv

from conftest import perturb

needs_bf16 = pytest.mark.skipif(not bf16.supported(), reason="this CPU has no avx512_bf16/AMX (or PyTorch no oneDNN bf16)")
SMALL = ModelConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.5)


def test_subpixel_weights_are_exact():
    """Four 2x2 convs on the low-resolution map == nearest 2x upsampling then the 3x3 conv (float64, no CPU needs)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)  # (2, 5, 12, 10)
    out = F.conv2d(x, bf16.subpixel_weights(w).double(), padding=1)  # (2, 20, 7, 6): phase 2a+b in block 2a+b
    y = torch.empty_like(ref)
    for a in range(2):
        for b in range(2):
            k = 2 * a + b
            y[:, :, a::2, b::2] = out[:, 5 * k : 5 * k + 5, a : a + 6, b : b + 5]
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)  # the weights are summed in float32


@needs_bf16
@pytest.mark.parametrize("kind", ["3x3", "1x1", "stride2", "add"])
def test_conv_matches_float_math_on_bf16_values(kind):
    g = torch.Generator().manual_seed(1)
    conv = {"3x3": torch.nn.Conv2d(32, 48, 3, padding=1), "1x1": torch.nn.Conv2d(32, 16, 1),
            "stride2": torch.nn.Conv2d(32, 32, 3, stride=2), "add": torch.nn.Conv2d(32, 32, 3, padding=1)}[kind].bfloat16()
    x = torch.randn(2, 32, 15, 12, generator=g).bfloat16()
    other = torch.randn(2, 32, 15, 12, generator=g).bfloat16() if kind == "add" else None
    with torch.no_grad():
        out = bf16.conv2d(conv, x, add=other)
        ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), conv.stride, conv.padding)  # fp32 on the same values
        ref = ref + other.float() if other is not None else ref
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=2 ** -7)  # one bf16 rounding of the result


@needs_bf16
def test_upsample_conv_matches_float_math():
    g = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1).bfloat16()
    x = torch.randn(2, 32, 9, 7, generator=g).bfloat16()
    with torch.no_grad():
        out = bf16.upsample_conv2d(conv, x)
        ref = F.conv2d(F.interpolate(x.float(), scale_factor=2.0, mode="nearest"), conv.weight.float(), conv.bias.float(), padding=1)
    assert out.shape == (2, 48, 18, 14) and out.is_contiguous(memory_format=torch.channels_last)
    # the summed 2x2 weights are rounded to bf16 once: a little more than one rounding of the output
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=2 ** -6)


@needs_bf16
def test_vae_error_no_worse_than_diffusers_bf16():
    """Decode of a bf16 model: PSNR vs fp32 eager at least that of diffusers' own bf16 eager (minus 0.5 dB)."""
    vae = perturb(ka.create(SMALL))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        ref = vae.decode(z).sample  # fp32 eager
        plain = copy.deepcopy(vae).to(torch.bfloat16)
        theirs = plain.decode(z.bfloat16()).sample.float()
        ours_vae = fastconv.optimize(copy.deepcopy(vae).to(torch.bfloat16))
        ours = ka.decode(ours_vae, ka.normalize_latents(ours_vae, z))
        z_ours = ka.encode_moments(ours_vae, x)[0]
    assert fastconv.is_optimized(ours_vae) and next(ours_vae.parameters()).dtype == torch.bfloat16
    assert psnr(ours.clamp(-1, 1), ref.clamp(-1, 1)) >= psnr(theirs.clamp(-1, 1), ref.clamp(-1, 1)) - 0.5
    theirs_z = plain.encode(x.bfloat16()).latent_dist.mean.float()
    assert (z_ours - z).abs().max() <= 1.5 * (theirs_z - z).abs().max() + 1e-3


def test_without_native_bf16_the_model_runs_fp32(monkeypatch):
    monkeypatch.setattr(bf16, "supported", lambda: False)
    vae = ka.create(SMALL).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastconv.optimize(vae)
    assert len(caught) == 1 and "fp32" in str(caught[0].message)
    assert next(vae.parameters()).dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert ka.decode(vae, z).dtype == torch.float32


@needs_bf16
def test_bf16_packed_weights_follow_changes_and_are_not_state():
    conv = fastconv.optimize(torch.nn.Conv2d(32, 32, 3, padding=1).bfloat16())
    x = torch.randn(1, 32, 10, 10).bfloat16()
    with torch.no_grad():
        conv(x)
        assert "_bf16_cache" in conv.__dict__
        conv.weight.mul_(-1)
        ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
        torch.testing.assert_close(conv(x).float(), ref, atol=0.02, rtol=2 ** -7)
    assert list(conv.state_dict()) == ["weight", "bias"]
    twin = copy.deepcopy(conv)
    assert not twin.__dict__.get("_bf16_cache")


@pytest.mark.parametrize("layout", ["bf16 channels_last", "fp32 nchw"])
def test_downsample_pad_is_f_pad(layout):
    x = torch.randn(2, 16, 7, 6, generator=torch.Generator().manual_seed(8))
    cl = layout.endswith("channels_last")
    x = x.bfloat16().contiguous(memory_format=torch.channels_last) if cl else x
    y = fastconv.pad_right_bottom(x)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert torch.equal(y, F.pad(x, (0, 1, 0, 1)))


@needs_bf16
def test_upsample_sums_give_norm1_statistics():
    """bf16.upsample_conv2d also sums each channel while it writes the 2x map; GroupNorm's (scale, shift) folded
    from those sums equal the ones of a statistics pass over the map itself (a copy without the sums), and
    the float64 reference."""
    from kl_autoencoder.inference import groupnorm

    g = torch.Generator().manual_seed(9)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1).bfloat16()
    norm = torch.nn.GroupNorm(8, 48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
        norm.bias.copy_(torch.randn(48, generator=g))
        x = (torch.randn(2, 32, 9, 70, generator=g) + 3).bfloat16().contiguous(memory_format=torch.channels_last)
        y = bf16.upsample_conv2d(conv, x)
        assert hasattr(y, "_kl_channel_sums")
        fused = groupnorm.norm_scale_shift(norm, y)
        plain = groupnorm.norm_scale_shift(norm, y.clone())  # a clone carries no sums: the statistics pass
        ref = F.group_norm(y.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps)
    assert not hasattr(y.clone(), "_kl_channel_sums")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    got = y.double() * fused[0].double()[..., None, None] + fused[1].double()[..., None, None]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@needs_bf16
def test_bf16_packed_weights_kept_per_input_size():
    """Exact tiling alternates tile sizes: each size keeps its packed weight (packed once), up to PACKED_SIZES."""
    conv = fastconv.optimize(torch.nn.Conv2d(32, 32, 3, padding=1).bfloat16())
    sizes = [(1, 32, 10, 10), (1, 32, 10, 7), (1, 32, 6, 10)]
    with torch.no_grad():
        for s in sizes:
            conv(torch.randn(*s).bfloat16())
        table = conv.__dict__["_bf16_cache"]["conv"][1]
        packed = {k: v[0] for k, v in table.items()}
        for s in sizes * 2:  # alternating again: nothing repacked
            x = torch.randn(*s).bfloat16()
            ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), padding=1)
            torch.testing.assert_close(conv(x).float(), ref, atol=0.02, rtol=2 ** -7)
        assert len(table) == 3 and all(table[k][0] is v for k, v in packed.items())
        for h in range(11, 11 + bf16.PACKED_SIZES):
            conv(torch.randn(1, 32, h, 5).bfloat16())
        assert len(table) == bf16.PACKED_SIZES
