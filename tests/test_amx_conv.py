"""AMX 3x3 convolutions (inference/amx_conv.py) against float64 math on the same bf16 values, their GroupNorm
statistics, the strided-apply GroupNorm kernel they rely on, and the bf16 ResnetBlock2D / Downsample2D / Upsample2D
paths."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import kl_autoencoder as ka
from kl_autoencoder.config import ModelConfig
from kl_autoencoder.evaluation.metrics import psnr
from kl_autoencoder.inference import amx_conv, bf16, fastconv, groupnorm

from conftest import perturb

needs_amx = pytest.mark.skipif(not (amx_conv.supported() and bf16.supported()),
                               reason="this CPU has no AMX bf16 (or Linux did not grant the tile state)")
CL = torch.channels_last
# channels of 32 and widths of 32 at the first two levels (AMX), 16 and 8 wide below (oneDNN): both paths
WIDE = ModelConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.5)


def _padded(x: torch.Tensor) -> torch.Tensor:
    p = amx_conv.padded_empty(*x.shape)
    amx_conv.interior(p).copy_(x)
    return p


def _bf16_conv(ci: int, co: int, stride: int = 1, seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(ci, co, 3, stride=stride, padding=1 if stride == 1 else 0).bfloat16().requires_grad_(False)


# one bf16 rounding of the result (half an ulp: 2^-8 relative at most) + float32 sums of up to 4608 products
RTOL, ATOL = 2 ** -8, 2e-3


@needs_amx
@pytest.mark.parametrize("b,ci,co,h,w", [(1, 32, 32, 5, 32), (2, 64, 96, 7, 64), (1, 128, 256, 9, 96), (1, 512, 512, 3, 32)])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_matches_float64_on_bf16_values(b, ci, co, h, w, residual):
    """Every tap, channel pair, output block and channel chunk (512 x 512 splits into 8 chunks of 64 outputs)."""
    g = torch.Generator().manual_seed(ci + co + h)
    conv = _bf16_conv(ci, co)
    x = torch.randn(b, ci, h, w, generator=g).bfloat16()
    res = torch.randn(b, co, h, w, generator=g).bfloat16().contiguous(memory_format=CL) if residual else None
    y = amx_conv.conv3x3(conv, _padded(x), residual=res)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    ref = ref + res.double() if residual else ref
    assert y.dtype == torch.bfloat16 and y.shape == (b, co, h, w) and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)


@needs_amx
def test_stride2_conv_is_downsample2d():
    """diffusers' Downsample2D: pad (0, 1, 0, 1), then a 3x3 stride-2 conv without padding."""
    g = torch.Generator().manual_seed(5)
    conv = _bf16_conv(64, 64, stride=2)
    x = torch.randn(2, 64, 11, 128, generator=g).bfloat16().contiguous(memory_format=CL)
    xp = fastconv.pad_right_bottom(x)
    assert amx_conv.applies_strided(conv, xp)
    y = amx_conv.conv3x3(conv, xp)
    ref = F.conv2d(F.pad(x.double(), (0, 1, 0, 1)), conv.weight.double(), conv.bias.double(), stride=2)
    assert y.shape == ref.shape == (2, 64, 5, 64)  # odd height: the last row is dropped
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)


@needs_amx
@pytest.mark.parametrize("b,ci,co,h,w", [(1, 32, 32, 3, 32), (2, 64, 96, 5, 64), (1, 512, 512, 2, 32)])
def test_upsample_is_nearest_2x_then_conv(b, ci, co, h, w):
    """Upsample2D as four 2x2 sub-pixel convs written in place in the 2x map: float64 math on the same bf16 values
    (the sub-pixel weights are summed in float32 and rounded to bf16 once, as oneDNN's path does), that path
    itself, and the attached statistics."""
    g = torch.Generator().manual_seed(ci + h)
    conv = _bf16_conv(ci, co)
    x = torch.randn(b, ci, h, w, generator=g).bfloat16().contiguous(memory_format=CL)
    y = amx_conv.upsample_conv(conv, x)
    assert y.shape == (b, co, 2 * h, 2 * w) and y.is_contiguous(memory_format=CL)
    wsub = bf16.subpixel_weights(conv.weight).to(torch.bfloat16).double()  # (4 C_out, C_in, 2, 2): phase 2a + b
    out = F.conv2d(x.double(), wsub, conv.bias.double().repeat(4), padding=1)  # (B, 4 C_out, h + 1, w + 1)
    ref = torch.empty(b, co, 2 * h, 2 * w, dtype=torch.float64)
    for a in range(2):
        for c in range(2):
            k = 2 * a + c
            ref[:, :, a::2, c::2] = out[:, k * co : (k + 1) * co, a : a + h, c : c + w]
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)
    theirs = bf16.upsample_conv2d(conv, x)  # oneDNN: the same rounded weights, float sums
    torch.testing.assert_close(y.double(), theirs.double(), rtol=2 ** -7, atol=1e-2)
    sums, shifts = getattr(y, "_kl_channel_sums")
    n = 4 * h * w
    torch.testing.assert_close(shifts.double() + sums[:, 0] / n, y.double().mean((2, 3)), rtol=0, atol=1e-6)


@needs_amx
def test_output_into_a_padded_interior_keeps_the_border():
    g = torch.Generator().manual_seed(6)
    conv = _bf16_conv(32, 64)
    x = torch.randn(1, 32, 6, 32, generator=g).bfloat16()
    out = amx_conv.padded_empty(1, 64, 6, 32)
    y = amx_conv.conv3x3(conv, _padded(x), out=amx_conv.interior(out))
    assert y.data_ptr() == amx_conv.interior(out).data_ptr()
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    torch.testing.assert_close(amx_conv.interior(out).double(), ref, rtol=RTOL, atol=ATOL)
    border = out.clone()
    border[:, :, 1:-1, 1:-1] = 0
    assert not border.any()  # the next conv reads this border as its zero padding


@needs_amx
@pytest.mark.parametrize("co,shift", [(64, 0.0), (512, 40.0)])
def test_statistics_of_the_written_output(co, shift):
    """Per-channel mean and M2 of the rounded outputs (per row from its first value, merged across rows, chunks and
    threads by Chan's update) against float64 on the output itself; a large common offset must not cancel."""
    g = torch.Generator().manual_seed(7)
    conv = _bf16_conv(64, co)
    with torch.no_grad():
        conv.bias.add_(shift)
    x = torch.randn(2, 64, 13, 64, generator=g).bfloat16()
    y = amx_conv.conv3x3(conv, _padded(x), stats=True)
    sums, shifts = getattr(y, "_kl_channel_sums")  # groupnorm's attached form: sums of (y - K) and (y - K)^2
    yd = y.double()
    n = yd.shape[2] * yd.shape[3]
    mean = yd.mean((2, 3))
    m2 = ((yd - mean[..., None, None]) ** 2).sum((2, 3))
    got_mean = shifts.double() + sums[:, 0] / n
    got_m2 = sums[:, 1] - sums[:, 0] ** 2 / n
    torch.testing.assert_close(got_mean, mean, rtol=0, atol=1e-6 * (1 + shift))
    torch.testing.assert_close(got_m2, m2, rtol=1e-5, atol=1e-6)
    norm = torch.nn.GroupNorm(8, co)
    scale, sh = groupnorm.norm_scale_shift(norm, y)  # folded from the attached moments
    ref = F.group_norm(yd, 8, eps=norm.eps)
    torch.testing.assert_close(yd * scale.double()[..., None, None] + sh.double()[..., None, None], ref, rtol=0, atol=1e-4)


def test_apply_into_a_view_is_silu_of_the_affine_map():
    """The GroupNorm + SiLU apply into a row-strided view (a padded map's interior): float64 math on the same values,
    one bf16 rounding, and nothing outside the view written."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 48, 5, 7, generator=g).bfloat16().contiguous(memory_format=CL)
    scale, shift = torch.randn(2, 48, generator=g), torch.randn(2, 48, generator=g)
    p = torch.zeros(2, 48, 7, 9, dtype=torch.bfloat16).contiguous(memory_format=CL)
    groupnorm.apply_scale_shift_into(x, p[:, :, 1:-1, 1:-1], scale, shift, silu=True)
    ref = F.silu(x.double() * scale.double()[..., None, None] + shift.double()[..., None, None])
    torch.testing.assert_close(p[:, :, 1:-1, 1:-1].double(), ref, rtol=2 ** -8, atol=1e-3)
    p[:, :, 1:-1, 1:-1] = 0
    assert not p.any()  # nothing outside the view written


@needs_amx
def test_packed_weights_follow_changes_and_are_not_state():
    conv = _bf16_conv(32, 32)
    x = torch.randn(1, 32, 4, 32).bfloat16()
    amx_conv.conv3x3(conv, _padded(x))
    conv.weight.mul_(-1)
    conv.bias.add_(1)
    y = amx_conv.conv3x3(conv, _padded(x))
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    torch.testing.assert_close(y.double(), ref, rtol=RTOL, atol=ATOL)
    assert list(conv.state_dict()) == ["weight", "bias"] and not copy.deepcopy(conv).__dict__.get("_amx_cache")


@needs_amx
def test_network_runs_on_amx_and_matches_the_onednn_path(monkeypatch):
    """A bf16 encode/decode with AMX blocks: blocks, down- and upsamplers of the wide levels take the AMX path
    (counted), and the result is as close to fp32 eager as the oneDNN-only path's and diffusers' own bf16."""
    vae = perturb(ka.create(WIDE))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    calls = []
    real, real_up = amx_conv.conv3x3, amx_conv.upsample_conv
    monkeypatch.setattr(amx_conv, "conv3x3", lambda conv, xp, **kw: calls.append(conv.stride) or real(conv, xp, **kw))
    monkeypatch.setattr(amx_conv, "upsample_conv", lambda conv, x, **kw: calls.append("up") or real_up(conv, x, **kw))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        ref = vae.decode(z).sample  # fp32 eager
        plain = copy.deepcopy(vae).to(torch.bfloat16)
        theirs = plain.decode(z.bfloat16()).sample.float()
        theirs_z = plain.encode(x.bfloat16()).latent_dist.mean.float()
        ours_vae = fastconv.optimize(copy.deepcopy(vae).to(torch.bfloat16))
        ours_z = ka.encode_moments(ours_vae, x)[0]
        ours = ka.decode(ours_vae, ka.normalize_latents(ours_vae, z))
        n_amx = len(calls)
        monkeypatch.setattr(amx_conv, "supported", lambda: False)
        onednn_z = ka.encode_moments(ours_vae, x)[0]
        onednn = ka.decode(ours_vae, ka.normalize_latents(ours_vae, z))
    assert n_amx > 0 and len(calls) == n_amx and {(2, 2), (1, 1), "up"} <= set(calls)
    p_ours, p_onednn, p_theirs = (psnr(a.clamp(-1, 1), ref.clamp(-1, 1)) for a in (ours, onednn, theirs))
    assert p_ours >= min(p_onednn, p_theirs) - 0.5
    assert (ours_z - z).abs().max() <= 1.5 * max((onednn_z - z).abs().max(), (theirs_z - z).abs().max()) + 1e-3
