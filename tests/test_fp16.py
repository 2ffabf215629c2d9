"""Half-precision safety: check-fp16 flags an overflowing VAE, not a healthy one; half decode falls back."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.evaluation.precision import FP16_MAX, check_fp16
from kl_autoencoder.evaluation.samples import synthetic_images

from conftest import MICRO, perturb

LAYER = "decoder.mid_block.resnets.0.conv1"
HEALTHY = dataclasses.replace(MICRO, force_upcast=False)


def overflowing(vae: torch.nn.Module) -> torch.nn.Module:
    """One decoder conv scaled so its outputs exceed 65504; the following GroupNorm hides it in fp32."""
    with torch.no_grad():
        vae.decoder.mid_block.resnets[0].conv1.weight.mul_(1e5)
    return vae


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return synthetic_images(2, 32)


@pytest.mark.parametrize("fp16_mode", ["emulate", "native"])
def test_healthy_model_is_not_flagged(images, fp16_mode):
    report = check_fp16(perturb(ka.create(HEALTHY)), images, fp16_mode=fp16_mode)
    assert report.results["fp16"].emulated == (fp16_mode == "emulate")
    assert not report.fp16_unsafe and not report.over_fp16_range
    for name in ("fp16", "bf16"):
        r = report.results[name]
        assert r.error is None and r.finite and r.safe and not r.overflow_layers
        assert r.psnr_vs_fp32 > 35 and r.latent_rel_error < 0.05
    assert report.results["fp16"].psnr_vs_fp32 > report.results["bf16"].psnr_vs_fp32  # 10 vs 7 mantissa bits
    assert "fp16 safe" in report.format()


@pytest.mark.parametrize("fp16_mode", ["emulate", "native"])
def test_overflowing_model_is_flagged(images, fp16_mode):
    vae = overflowing(perturb(ka.create(HEALTHY)))
    report = check_fp16(vae, images, fp16_mode=fp16_mode)
    assert report.fp16_unsafe
    fp16, bf16 = report.results["fp16"], report.results["bf16"]
    assert not fp16.finite and fp16.overflow_layers[0] == LAYER  # the scaled layer is the first to overflow
    assert bf16.finite and bf16.safe  # bf16 has fp32's exponent range
    # the recorded fp32 maximum matches an independent forward pass up to that layer
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean  # (2, 4, 4, 4)
        h = vae.decoder.conv_in(vae.post_quant_conv(z))
        res = vae.decoder.mid_block.resnets[0]
        h = res.conv1(F.silu(res.norm1(h)))
    want = float(h.abs().max())
    assert want > FP16_MAX and LAYER in report.over_fp16_range
    assert report.activations[LAYER] == pytest.approx(want, rel=1e-5)
    assert "UNSAFE" in report.format() and LAYER in report.format()


def test_half_decode_of_overflowing_model_falls_back_to_fp32(images):
    vae = overflowing(perturb(ka.create(HEALTHY)))
    latents = ka.encode(vae, images, tiling="never")  # (2, 4, 4, 4)
    half = vae.half()
    want = ka.decode(copy.deepcopy(half).float(), latents, tiling="never")  # the fp16-rounded weights, in fp32
    with torch.no_grad():  # without the fallback, fp16 gives NaN/inf (the black-image bug)
        raw = half.decoder(half.post_quant_conv(ka.denormalize_latents(half, latents).half()))
    assert not torch.isfinite(raw).all()
    with pytest.warns(UserWarning, match="overflowed"):
        out = ka.decode(half, latents, tiling="never")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_cli_sets_force_upcast_only_when_unsafe(tmp_path, capsys):
    good = ka.export(perturb(ka.create(HEALTHY)), tmp_path / "good")
    bad = ka.export(overflowing(perturb(ka.create(HEALTHY))), tmp_path / "bad")
    assert json.loads((bad / "config.json").read_text())["force_upcast"] is False
    assert cli.main(["check-fp16", str(bad), "--size", "32"]) == 0
    assert json.loads((bad / "config.json").read_text())["force_upcast"] is True
    assert "set force_upcast=true" in capsys.readouterr().out
    assert cli.main(["check-fp16", str(good), "--size", "32"]) == 0
    assert json.loads((good / "config.json").read_text())["force_upcast"] is False
    assert ka.load(bad).config.force_upcast is True  # diffusers reads it back


def test_force_upcast_shared_by_concurrent_calls():
    """Two threads decode with one fp16 force_upcast model; the first call out must not cast the weights back to
    fp16 under the second, still running (forced here: the first finishes while the second waits mid-forward)."""
    import threading

    vae = ka.create(MICRO).half()
    vae.register_to_config(force_upcast=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ka.decode(copy.deepcopy(vae).float(), z)
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()

    def gate(module, args):
        if threading.current_thread().name == "A":
            a_inside.set()
            assert b_inside.wait(30)
        elif threading.current_thread().name == "B":
            b_inside.set()
            assert a_done.wait(30)  # A returns (and leaves the upcast) while B is inside its forward

    hook = vae.decoder.conv_in.register_forward_pre_hook(gate)
    out, errors = {}, []

    def run(name):
        try:
            out[name] = ka.decode(vae, z)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            if name == "A":
                a_done.set()

    a = threading.Thread(target=run, args=("A",), name="A")
    b = threading.Thread(target=run, args=("B",), name="B")
    a.start()
    assert a_inside.wait(30)
    b.start()
    a.join(60)
    b.join(60)
    hook.remove()
    assert not errors, errors
    for name in "AB":
        torch.testing.assert_close(out[name], ref, atol=1e-5, rtol=0)
    assert next(vae.parameters()).dtype == torch.float16 and not vae.__dict__["_kl_upcast_calls"]
