"""Fast CPU inference (fp32): outputs match eager within 1e-4, the switch restores eager exactly, weights untouched."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

import kl_autoencoder as ka
from kl_autoencoder import settings
from kl_autoencoder.inference import fastconv, groupnorm, winograd
from kl_autoencoder.config import ModelConfig

from conftest import perturb

pytestmark = pytest.mark.skipif(
    fastconv.winograd_library() is None and not fastconv.nnpack_available(), reason="no gcc/OpenMP and no NNPACK here"
)
# skipped only where there is no compiler: a kernel that fails to build with gcc present fails the tests
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the Winograd kernels")

# Wide enough (>= MIN_CHANNELS) that the 3x3 convs take the fast path.
SMALL = ModelConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.5)


@pytest.fixture
def small_vae():
    return perturb(ka.create(SMALL))


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def test_single_conv_matches_conv2d():
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    fastconv.optimize(conv)
    x = torch.randn(2, 32, 20, 12)
    with torch.no_grad():
        out = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)  # independent: the functional eager conv
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert fastconv.is_optimized(conv)


@pytest.mark.parametrize("m, r", [(4, 3), (6, 3), (7, 2)])
def test_winograd_matrices_compute_1d_correlation(m, r):
    at, g, bt = winograd.winograd_matrices(m, r)  # (m, t), (t, r), (t, t)
    gen = torch.Generator().manual_seed(m)
    d, w = torch.randn(m + r - 1, generator=gen, dtype=torch.float64), torch.randn(r, generator=gen, dtype=torch.float64)
    ref = torch.tensor([sum(float(d[i + k] * w[k]) for k in range(r)) for i in range(m)], dtype=torch.float64)  # by hand
    torch.testing.assert_close(at @ ((g @ w) * (bt @ d)), ref, atol=1e-12, rtol=1e-12)


@needs_gcc
@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("shape", [(2, 32, 13, 19), (1, 48, 6, 6), (1, 16, 1, 2), (1, 32, 40, 25), (1, 64, 7, 90)])
def test_winograd_conv_matches_conv2d(m, shape):
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 16 if shape[1] == 48 else 80 if shape[1] == 64 else 32, 3, padding=1, bias=shape[0] == 1)
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        out = winograd.winograd_conv2d(conv, x, m)
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)  # independent: the functional eager conv
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        out_cl = winograd.winograd_conv2d(conv, x.contiguous(memory_format=torch.channels_last), m)
    torch.testing.assert_close(out_cl, ref, atol=1e-4, rtol=1e-4)


@needs_gcc
@pytest.mark.parametrize("blocks", ["strips", "l2", "whole", "bands"])
def test_winograd_fused_prologue(blocks, monkeypatch):
    """silu(x * scale + shift) and the conv in one kernel == the eager ops, whatever the blocks: L2-sized ones
    (one-row strips .. the whole image in one block) where the weights do not fit the last-level cache, row bands
    where they do."""
    big_cache = blocks == "bands"
    monkeypatch.setattr(winograd, "last_level_cache_bytes", lambda: (1 << 40) if big_cache else 0)
    monkeypatch.setattr(winograd, "BLOCK_BYTES", {"strips": 1 << 12, "l2": 3 << 19, "whole": 1 << 28, "bands": 0}[blocks])
    gen = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(2, 32, 21, 37, generator=gen) * 2 + 0.5
    scale, shift = torch.randn(2, 32, generator=gen), torch.randn(2, 32, generator=gen)  # (B, C) per image
    with torch.no_grad():
        out = winograd.winograd_conv2d(conv, x, scale=scale, shift=shift, silu=True)
        pre = F.silu(x * scale[:, :, None, None] + shift[:, :, None, None])
        ref = conv._conv_forward(pre, conv.weight, conv.bias)
        plain = winograd.winograd_conv2d(conv, x)  # no prologue
        ref_plain = conv._conv_forward(x, conv.weight, conv.bias)
    assert out.shape == ref.shape == (2, 48, 21, 37)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain, ref_plain, atol=1e-4, rtol=1e-4)


@needs_gcc
@pytest.mark.parametrize("shape", [(2, 32, 13, 19), (1, 16, 1, 2), (1, 64, 20, 33), (1, 32, 7, 90), (1, 160, 9, 11)])
@pytest.mark.parametrize("blocks", ["default", "one-row", "channel-parts"])
def test_winograd_subpixel_upsample_conv_matches_eager(shape, blocks, monkeypatch):
    """Nearest 2x + 3x3 conv as four 2x2 sub-pixel convs by F(7,2), each phase written into the 2x map ==
    diffusers' two eager ops in float64, whatever the work split (tile bands, channel parts); 160 input channels:
    the products summed over a chunk of 128 and one of 32."""
    if blocks == "one-row":
        monkeypatch.setattr(winograd, "subpixel_block_shape", lambda *a: (1, 2, 1))
    elif blocks == "channel-parts":  # parts of 64 of the 4 x C_out outputs: 16 channels x 4 phases each
        monkeypatch.setattr(winograd, "subpixel_block_shape", lambda h, w, ci, co, nt: (100, 100, co // 64))
    gen = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(shape[1], 48 if shape[1] == 32 else 16, 3, padding=1)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(*shape, generator=gen)
    with torch.no_grad():
        out = winograd.winograd_upsample_conv2d(conv, x)
        up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
        ref = F.conv2d(up, conv.weight.double(), conv.bias.double(), padding=1)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_subpixel_block_shape_splits_rows_before_channels(monkeypatch):
    monkeypatch.setattr(winograd, "last_level_cache_bytes", lambda: 0)
    assert winograd.subpixel_block_shape(129, 129, 512, 2048, 2) == (5, 19, 1)  # 4 bands of 19 x 5 tiles
    rows, cols, parts = winograd.subpixel_block_shape(65, 65, 512, 2048, 2)  # bands would hold < 64 tiles
    assert parts > 1 and rows * cols >= 100


@pytest.mark.parametrize("ci, co, size", [(128, 128, 512), (256, 256, 256), (512, 512, 128), (512, 512, 64), (256, 128, 512), (64, 64, 50)])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_row_bands_when_the_weights_fit_the_last_level_cache(ci, co, size, threads, monkeypatch):
    """With the transformed weights inside a quarter of the last-level cache: whole tile rows per block, no
    channel split, at least 2 blocks per thread, the busiest thread within one block of the mean, a frequency's
    V + M rows within ROW_BAND_BYTES unless the weight reuse asks for more tiles; without: the L2-sized blocks."""
    n_h = n_w = -(-size // 6)
    min_tiles = ci * co // winograd.BAND_WEIGHT_REUSE
    monkeypatch.setattr(winograd, "last_level_cache_bytes", lambda: 0)
    l2_blocks = winograd.block_shape(size, size, ci, co, threads)
    monkeypatch.setattr(winograd, "last_level_cache_bytes", lambda: 1 << 40)
    rows, cols, parts = winograd.block_shape(size, size, ci, co, threads)
    if -(-n_h // max(1, -(-min_tiles // n_w))) < 2 * threads:  # too few tile rows for 2 bands per thread
        assert (rows, cols, parts) == l2_blocks
        return
    blocks = -(-n_h // rows)
    assert (cols, parts) == (n_w, 1) and blocks >= 2 * threads
    assert -(-blocks // threads) * threads - blocks < threads
    tiles = rows * n_w
    assert tiles >= min_tiles
    assert rows == 1 or tiles * (ci + co) * 4 <= winograd.ROW_BAND_BYTES or (rows - 1) * n_w < min_tiles
    monkeypatch.setattr(winograd, "last_level_cache_bytes", lambda: 64 * ci * co * 4 * 4 - 1)  # just too small
    rows2, cols2, _ = winograd.block_shape(size, size, ci, co, threads)
    t2 = rows2 * cols2
    assert t2 >= winograd.MIN_BLOCK_TILES or (rows2, cols2) == (n_h, n_w)


@needs_gcc
def test_winograd_weight_cache_follows_weight_changes():
    conv = fastconv.optimize(torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 32, 12, 12)
    with torch.no_grad():
        conv(x)
        assert "_fastconv_cache" in conv.__dict__  # the Winograd path ran and cached its weights
        conv.weight.mul_(-2.0)  # in place: version counter changes
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
        conv.weight = torch.nn.Parameter(torch.randn(32, 32, 3, 3) * 0.1)  # replaced
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)
    assert "_fastconv_cache" not in dict(conv.named_buffers()) and list(conv.state_dict()) == ["weight", "bias"]
    twin = copy.deepcopy(conv)  # the packed cache is not copied; the copy rebuilds its own
    with torch.no_grad():
        twin.weight.mul_(0.5)
        torch.testing.assert_close(twin(x), F.conv2d(x, twin.weight, twin.bias, padding=1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not fastconv.nnpack_available(), reason="this PyTorch build has no NNPACK")
def test_nnpack_fallback_without_compiler(monkeypatch):
    monkeypatch.setattr(fastconv, "winograd_library", lambda: None)
    conv = fastconv.optimize(torch.nn.Conv2d(32, 48, 3, padding=1))
    x = torch.randn(1, 32, 20, 12)
    with torch.no_grad():
        out = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert fastconv.winograd_library() is None  # so NNPACK ran
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["default", "nnpack"])
def test_optimized_vae_matches_eager(small_vae, path, monkeypatch):
    if path == "nnpack":  # no C kernels: NNPACK convs, eager GroupNorm
        if not fastconv.nnpack_available():
            pytest.skip("this PyTorch build has no NNPACK")
        monkeypatch.setattr(fastconv, "winograd_library", lambda: None)
        monkeypatch.setattr(fastconv.groupnorm, "library", lambda: None)
    eager = copy.deepcopy(small_vae)
    before = {k: v.clone() for k, v in small_vae.state_dict().items()}
    fast = fastconv.optimize(small_vae)
    assert fast is small_vae and fastconv.is_optimized(fast)
    x = _images()
    with torch.inference_mode():
        z_ref = ka.encode(eager, x)
        z = ka.encode(fast, x)
        y_ref = ka.decode(eager, z_ref)
        y = ka.decode(fast, z_ref)
    assert (z - z_ref).abs().max() <= 1e-4
    assert (y - y_ref).abs().max() <= 1e-4
    assert not torch.equal(y, y_ref)  # the fast path really ran (Winograd rounds differently)
    after = fast.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_switches_restore_exact_eager(small_vae, monkeypatch):
    eager = copy.deepcopy(small_vae)
    fast = fastconv.optimize(small_vae)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = ka.decode(eager, z)
        with fastconv.disabled():
            assert torch.equal(ka.decode(fast, z), ref)
        assert not torch.equal(ka.decode(fast, z), ref)
        settings.set_fastconv(False)  # what KL_AUTOENCODER_FASTCONV=0 sets at import
        try:
            assert torch.equal(ka.decode(fast, z), ref)
            assert not fastconv.is_optimized(fastconv.optimize(copy.deepcopy(eager)))  # switch off: optimize is a no-op
        finally:
            settings.set_fastconv(True)
        fastconv.optimize(fast, enabled=False)
        assert not fastconv.is_optimized(fast)
        assert torch.equal(ka.decode(fast, z), ref)


def test_training_uses_eager_and_gradients_flow(small_vae):
    fast = fastconv.optimize(small_vae)
    eager = copy.deepcopy(small_vae)
    fastconv.optimize(eager, enabled=False)
    x = _images(1, 32)
    out = fast.decode(fast.encode(x).latent_dist.mean).sample
    ref = eager.decode(eager.encode(x).latent_dist.mean).sample
    assert torch.equal(out, ref)  # autograd recording: eager path
    out.mean().backward()
    assert fast.decoder.conv_in.weight.grad is not None and torch.isfinite(fast.decoder.conv_in.weight.grad).all()


def test_eligibility():
    assert fastconv.eligible(torch.nn.Conv2d(32, 32, 3, padding=1))
    assert not fastconv.eligible(torch.nn.Conv2d(32, 32, 3, stride=2))
    assert not fastconv.eligible(torch.nn.Conv2d(32, 32, 1))
    assert not fastconv.eligible(torch.nn.Conv2d(3, 32, 3, padding=1))  # too few channels to gain
    assert not fastconv.eligible(torch.nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"))


def test_fused_blocks_match_eager_with_eager_convs(small_vae):
    """ResnetBlock2D (GroupNorm + SiLU in the conv staging, residual and statistics in the output pass) and
    Upsample2D (sub-pixel F(7,2)) patched, the other convs eager: within the 1e-4 the fast path promises."""
    eager = copy.deepcopy(small_vae)
    fast = fastconv.optimize(small_vae)
    fused = [m for m in fast.modules() if "forward" in m.__dict__ and type(m).__name__ in ("ResnetBlock2D", "Upsample2D")]
    assert {type(m).__name__ for m in fused} == {"ResnetBlock2D", "Upsample2D"}
    for m in fast.modules():  # back to eager convs, so that only the block code differs
        if isinstance(m, torch.nn.Conv2d):
            m.__dict__.pop("forward", None)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(z).sample, eager.decode(z).sample, atol=1e-4, rtol=1e-4)
        x = _images(1, 32)
        torch.testing.assert_close(fast.encode(x).latent_dist.mean, eager.encode(x).latent_dist.mean, atol=1e-4, rtol=1e-4)
    fastconv.optimize(fast, enabled=False)
    assert not any("forward" in m.__dict__ for m in fast.modules())


@needs_gcc
def test_pointwise_shortcut_accumulates_into_conv2_output():
    """A ResnetBlock2D with a 1x1 conv_shortcut (C_in != C_out): the shortcut runs as one matrix product per image
    added in place into conv2's output, its bias joined to conv2's (the module itself is not called); the block
    matches the same block in float64 within the 1e-4 promised."""
    from diffusers.models.resnet import ResnetBlock2D

    block = perturb(ResnetBlock2D(in_channels=32, out_channels=48, temb_channels=None, groups=8, eps=1e-6)).eval()
    with torch.no_grad():
        block.conv_shortcut.bias.normal_()  # a bias that matters
    ref_block = copy.deepcopy(block).double()
    fastconv.optimize(block)
    calls = []
    block.conv_shortcut.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 32, 20, 24, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = block(x, None)
        ref = ref_block(x.double(), None)
    assert calls == []  # the product path ran, not the module
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    with torch.inference_mode(), fastconv.disabled():
        block(x, None)
    assert calls == [1]  # the hook does fire when the module runs


@needs_gcc
def test_winograd_residual_is_added_as_the_output_is_written():
    """``residual=`` gives exactly the conv followed by an in-place add (same sums, same order), and a ResnetBlock2D
    without shortcut conv (its residual taken that way) matches the same block in float64 within 1e-4."""
    from diffusers.models.resnet import ResnetBlock2D

    gen = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x, res = torch.randn(2, 32, 19, 37, generator=gen), torch.randn(2, 32, 19, 37, generator=gen)  # 37: 16-col runs + tails
    with torch.no_grad():
        fused = winograd.winograd_conv2d(conv, x, residual=res)
        separate = winograd.winograd_conv2d(conv, x).add_(res)
        ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + res.double()
    assert torch.equal(fused, separate)
    torch.testing.assert_close(fused.double(), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="residual of shape"):
        winograd.winograd_conv2d(conv, x, residual=res[:, :, :-1])

    block = perturb(ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None, groups=8, eps=1e-6)).eval()
    ref_block = copy.deepcopy(block).double()
    fastconv.optimize(block)
    with torch.inference_mode():
        out = block(x, None)
        expect = ref_block(x.double(), None)
    torch.testing.assert_close(out.double(), expect, atol=1e-4, rtol=1e-4)


@needs_gcc
@pytest.mark.parametrize("blocks", ["bands", "strips", "channel-parts"])
def test_winograd_output_statistics_are_groupnorms(blocks, monkeypatch):
    """``stats=True``: the per-channel moments merged from every block (and thread) give the next GroupNorm the
    scale and shift that float64 statistics of the written output give; a residual is included."""
    monkeypatch.setattr(winograd, "last_level_cache_bytes", lambda: (1 << 40) if blocks == "bands" else 0)
    if blocks == "strips":
        monkeypatch.setattr(winograd, "BLOCK_BYTES", 1 << 12)
    elif blocks == "channel-parts":
        monkeypatch.setattr(winograd, "block_shape", lambda h, w, ci, co, nt, m: (100, 100, co // 64))
    gen = torch.Generator().manual_seed(6)
    conv, norm = torch.nn.Conv2d(32, 128, 3, padding=1), torch.nn.GroupNorm(8, 128, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    x = torch.randn(2, 32, 23, 41, generator=gen)
    res = torch.randn(2, 128, 23, 41, generator=gen) * 3 + 7  # a large mean: the shifts matter
    with torch.no_grad():
        y = winograd.winograd_conv2d(conv, x, residual=res, stats=True)
        assert getattr(y, "_kl_channel_sums", None) is not None  # the norm below reads these, not y
        scale, shift = groupnorm.norm_scale_shift(norm, y)  # from the kernel's moments
        g = y.double().view(2, 8, -1)
        mean, var = g.mean(2), g.var(2, unbiased=False)  # (B, G): independent, float64
        a = norm.weight.double().view(1, 8, -1) / (var + norm.eps).sqrt()[:, :, None]
        b = norm.bias.double().view(1, 8, -1) - mean[:, :, None] * a
    torch.testing.assert_close(scale.double(), a.reshape(2, 128), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shift.double(), b.reshape(2, 128), rtol=1e-6, atol=1e-5)


def test_environment_switches_are_read_once_at_import():
    """KL_AUTOENCODER_FASTCONV / _MALLOC are read by settings.py at import, in a fresh process."""
    import os
    import subprocess
    import sys

    code = ("from kl_autoencoder import settings; import torch; from kl_autoencoder.inference import fastconv;"
            "print(settings.fastconv_enabled(), settings.malloc_enabled(),"
            " fastconv.is_optimized(fastconv.optimize(torch.nn.Conv2d(32, 32, 3, padding=1))))")
    env = {**os.environ, settings.FASTCONV_ENV: "0", settings.MALLOC_ENV: "off"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["False", "False", "False"]
