"""GroupNorm (+ SiLU) kernels of inference/groupnorm.py against torch's own GroupNorm and SiLU."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from kl_autoencoder.inference import groupnorm

# skipped only where there is no compiler: a kernel that fails to build with gcc present fails the tests
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the kernels")


def _norm(groups: int, channels: int, seed: int = 0) -> torch.nn.GroupNorm:
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=g))
        norm.bias.copy_(torch.randn(channels, generator=g))
    return norm


@pytest.mark.parametrize("shape,groups", [((2, 32, 13, 11), 8), ((1, 128, 40, 40), 32), ((1, 64, 5, 3), 32), ((1, 16, 1, 1), 4)])
@pytest.mark.parametrize("silu", [True, False])
def test_fp32_matches_torch(shape, groups, silu):
    norm = _norm(groups, shape[1])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3 + 2
    with torch.no_grad():
        ref = F.group_norm(x.double(), groups, norm.weight.double(), norm.bias.double(), norm.eps)  # independent, float64
        ref = F.silu(ref) if silu else ref
        out = groupnorm.group_norm_silu(norm, x, silu)
    with torch.no_grad():
        assert groupnorm.supported(norm, x) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_statistics_do_not_cancel_on_a_large_offset():
    """Values 1000 + N(0, 1): E[x^2] - E[x]^2 in float32 would lose every digit; the shifted sums keep them."""
    norm = torch.nn.GroupNorm(4, 32, eps=1e-6)
    x = 1000 + torch.randn(1, 32, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scale, shift = groupnorm.norm_scale_shift(norm, x)  # (1, 32) each
        ref = F.group_norm(x.double(), 4, None, None, 1e-6)
    torch.testing.assert_close((x.double() * scale.double()[..., None, None] + shift.double()[..., None, None]), ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("shape,groups", [((2, 32, 9, 7), 8), ((1, 128, 32, 24), 32)])
def test_bf16_channels_last_no_worse_than_torch(shape, groups):
    """bf16 in and out: float32 statistics and one rounding; compared with float32 math on the same bf16 input,
    its error is at most torch's own bf16 GroupNorm + SiLU (which rounds twice)."""
    norm = _norm(groups, shape[1])
    nb = _norm(groups, shape[1]).bfloat16()
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2 + 1).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = F.silu(F.group_norm(x.double(), groups, nb.weight.double(), nb.bias.double(), norm.eps))
        ours = groupnorm.group_norm_silu(nb, x)
        torch_bf16 = F.silu(nb(x))
    with torch.no_grad():
        assert groupnorm.supported(nb, x)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
    err, err_torch = (ours.double() - exact).abs().max(), (torch_bf16.double() - exact).abs().max()
    assert err <= err_torch * 1.01 + 1e-6, (float(err), float(err_torch))


def test_not_supported_falls_back():
    norm = _norm(8, 32).requires_grad_(False)  # frozen: only the condition under test says no
    x = torch.randn(1, 32, 8, 8)
    assert groupnorm.supported(norm, x)
    assert not groupnorm.supported(norm, x.contiguous(memory_format=torch.channels_last))  # fp32 channels_last
    assert not groupnorm.supported(norm, x.double())
    with torch.enable_grad():
        assert not groupnorm.supported(norm, x.clone().requires_grad_())
    norm.forward = lambda t: t  # tiling_approx replaces norms' forward: the kernels must not bypass it
    assert not groupnorm.supported(norm, x)


def _ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at |v| (8 significant bits), for normal numbers."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -126)))) * 2.0 ** -7


def test_bf16_silu_within_one_rounding_step_of_exact():
    """The bf16 path's cheap SiLU (degree-5 exp, approximate reciprocal): every output equals the exactly rounded
    SiLU or is one bf16 step from it, over -100..100 (where exp(-x) overflows float32) and typical values, and
    99% are exactly it."""
    norm = torch.nn.GroupNorm(1, 16, eps=1e-6, affine=False)
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.linspace(-100, 100, 16 * 4000), torch.randn(16 * 4000, generator=g) * 4]).view(1, 16, -1, 8)
    x = x.bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        # identity normalisation: scale 1, shift 0, so the kernel applies SiLU to x itself
        scale, shift = torch.ones(1, 16), torch.zeros(1, 16)
        out = groupnorm.apply_scale_shift(x, scale, shift, silu=True).double()
    exact = F.silu(x.double())
    rounded = exact.bfloat16().double()
    tiny = exact.abs() < 1e-30  # x below about -70: SiLU underflows towards 0 (the kernel returns -0 there)
    steps = (out - rounded).abs()[~tiny] / _ulp_bf16(rounded[~tiny])
    assert torch.isfinite(out).all() and out[tiny].abs().max() < 1e-30
    assert steps.max() <= 1.0, float(steps.max())
    assert (out == rounded)[~tiny].double().mean() > 0.99


def test_inplace_apply_equals_a_new_tensor():
    norm = _norm(8, 32)
    x = (torch.randn(2, 32, 9, 7, generator=torch.Generator().manual_seed(6)) * 2).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        new = groupnorm.group_norm_silu(norm, x)
        y = x.clone()
        same = groupnorm.group_norm_silu(norm, y, inplace=True)
    assert same.data_ptr() == y.data_ptr() and torch.equal(same, new)


def test_attention_tokens_take_the_fast_forward_and_match_groupnorm():
    """diffusers Attention normalises (B, C, N) tokens whose memory is channels_last; the patched forward
    (fastconv) runs them through the bf16 kernels, and the class's forward whenever fast paths are off."""
    from kl_autoencoder import settings
    from kl_autoencoder.inference import tiling_approx

    norm = _norm(8, 32).bfloat16()
    norm.forward = groupnorm.fast_forward.__get__(norm)
    x4 = (torch.randn(2, 32, 6, 5, generator=torch.Generator().manual_seed(7)) * 3 + 1).bfloat16()
    x4 = x4.contiguous(memory_format=torch.channels_last)
    tokens = x4.view(2, 32, 30).transpose(1, 2)  # diffusers AttnProcessor2_0: (B, N, C)
    calls = []
    original = groupnorm.norm_scale_shift
    try:
        groupnorm.norm_scale_shift = lambda *a: calls.append(1) or original(*a)
        with torch.no_grad():
            out = norm(tokens.transpose(1, 2)).transpose(1, 2)  # what the processor calls
            with settings.use_fastconv(False):
                eager = norm(tokens.transpose(1, 2)).transpose(1, 2)
    finally:
        groupnorm.norm_scale_shift = original
    assert len(calls) == 1  # the fast path ran once, the disabled call did not use it
    exact = F.group_norm(x4.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps).view(2, 32, 30).transpose(1, 2)
    assert out.shape == tokens.shape and out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() <= (eager.double() - exact).abs().max() * 1.01 + 1e-6
    # tiling_approx swaps every norm's forward for fixed statistics and must give ours back afterwards
    net = torch.nn.Sequential(norm)
    with torch.no_grad():
        with tiling_approx._Norms(net).patched():
            assert getattr(norm.__dict__["forward"], "__func__", None) is not groupnorm.fast_forward
            assert not groupnorm.supported(norm, x4)
        assert norm.__dict__["forward"].__func__ is groupnorm.fast_forward and groupnorm.supported(norm, x4)


def test_training_keeps_eager_groupnorm_for_its_gradients():
    """With autograd recording and trainable weights the patched forward runs the class's (differentiable) one,
    even when the input itself needs no gradient (e.g. a frozen layer before it)."""
    norm = _norm(8, 32).bfloat16()
    norm.forward = groupnorm.fast_forward.__get__(norm)
    x = torch.randn(1, 32, 6, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    assert not groupnorm.supported(norm, x)  # grad enabled, weights trainable
    norm(x).float().sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None
    with torch.no_grad():
        assert groupnorm.supported(norm, x)
