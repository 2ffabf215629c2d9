"""Latent interpolation: the strip's ends are the plain reconstructions; slerp keeps the norm where lerp shrinks it."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import kl_autoencoder as ka
from kl_autoencoder import cli
from kl_autoencoder.utils.images import pil_to_tensor
from kl_autoencoder.evaluation.interpolation import interpolate, lerp, match_sizes, slerp

from conftest import sample_photos


@pytest.fixture
def small() -> list[Image.Image]:
    return sample_photos(32)  # 32x32: the machine is a shared 2-core CPU


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).double().norm(dim=1)


def test_strip_ends_are_the_reconstructions(micro_vae, small):
    a, b = small[0], small[2]  # 32x32 each
    strip = ka.interpolate(micro_vae, a, b, 3)
    assert strip.shape == (3, 3, 32, 32) and torch.isfinite(strip).all()
    torch.testing.assert_close(strip[0:1], ka.reconstruct(micro_vae, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(strip[-1:], ka.reconstruct(micro_vae, b), atol=1e-5, rtol=0)
    assert float((strip[1] - strip[0]).abs().mean()) > 1e-3  # the middle is neither end
    lin = interpolate(micro_vae, a, b, 3, mode="lerp")
    torch.testing.assert_close(lin[0:1], strip[0:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(lin[-1:], strip[-1:], atol=1e-5, rtol=0)
    # the middle image decodes the middle latent, computed here from the encoder directly
    za, zb = (ka.normalize_latents(micro_vae, ka.encode_moments(micro_vae, pil_to_tensor(p)[None])[0]) for p in (a, b))
    torch.testing.assert_close(lin[1:2], ka.decode(micro_vae, (za + zb) / 2).clamp(-1, 1), atol=1e-5, rtol=0)


def test_sizes_b_to_a_or_both_to_size(micro_vae, small, photos):
    a = small[0].resize((44, 32))  # a width that is not a multiple of 8: padded and cropped back
    b = photos[1]  # 64x64
    strip = interpolate(micro_vae, a, b, 2)
    assert strip.shape == (2, 3, 32, 44)
    torch.testing.assert_close(strip[0:1], ka.reconstruct(micro_vae, a), atol=1e-5, rtol=0)
    xa, xb, note = match_sizes(pil_to_tensor(a)[None], pil_to_tensor(b)[None])
    assert xb.shape == xa.shape and "B (64x64) resized and centre-cropped to A's size 44x32" in note
    torch.testing.assert_close(strip[1:2], ka.reconstruct(micro_vae, xb), atol=1e-5, rtol=0)
    _, _, note = match_sizes(xa, xb)
    assert "used as they are" in note
    sq = interpolate(micro_vae, a, b, 2, size=24)
    assert sq.shape == (2, 3, 24, 24)
    # a uniform-colour B stays that colour after resizing: the crop only takes pixels from B
    flat = torch.full((1, 3, 40, 100), 0.25)
    _, fb, _ = match_sizes(pil_to_tensor(a)[None], flat)
    torch.testing.assert_close(fb, torch.full((1, 3, 32, 44), 0.25), atol=1e-5, rtol=0)


def test_steps_below_two_is_an_error(micro_vae, small):
    for steps in (1, 0):
        with pytest.raises(ValueError, match="steps must be an integer >= 2"):
            interpolate(micro_vae, small[0], small[1], steps)
    with pytest.raises(ValueError, match="slerp or lerp"):
        interpolate(micro_vae, small[0], small[1], 3, mode="cubic")


def test_slerp_keeps_norm_between_ends_lerp_shrinks():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 4, 32, 32, generator=g)  # 4096-dim Gaussian latents
    b = torch.randn(16, 4, 32, 32, generator=g)
    na, nb = _norms(a), _norms(b)
    mid_lerp = _norms(lerp(a, b, 0.5)) / ((na + nb) / 2)
    assert float(mid_lerp.mean()) == pytest.approx(math.sqrt(0.5), abs=0.02)  # independent vectors: ~0.707x
    b2 = b * 1.7  # different end norms
    nb2 = _norms(b2)
    lo, hi = torch.minimum(na, nb2), torch.maximum(na, nb2)
    for t in torch.linspace(0, 1, 11).tolist():
        n = _norms(slerp(a, b2, t))
        assert bool(((n >= lo * (1 - 1e-9)) & (n <= hi * (1 + 1e-9))).all()), t
        torch.testing.assert_close(n, (1 - t) * na + t * nb2, atol=1e-6, rtol=1e-9)
    assert bool((_norms(lerp(a, b2, 0.5)) < 0.8 * (na + nb2) / 2).all())  # lerp's midpoint: ~0.73x slerp's
    assert torch.equal(slerp(a, b2, 0.0), a) and torch.equal(slerp(a, b2, 1.0), b2)


def test_slerp_equals_shoemake_for_equal_norms_and_falls_back_to_lerp():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 64, generator=g, dtype=torch.float64)
    b = torch.randn(3, 64, generator=g, dtype=torch.float64)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    t = 0.3
    for i in range(3):  # Shoemake (1985), in plain Python
        cos = float((a[i] @ b[i]) / (a[i].norm() * b[i].norm()))
        om = math.acos(cos)
        ref = math.sin((1 - t) * om) / math.sin(om) * a[i] + math.sin(t * om) / math.sin(om) * b[i]
        torch.testing.assert_close(slerp(a[i : i + 1], b[i : i + 1], t)[0], ref, atol=1e-10, rtol=1e-10)
    for other in (-2.0 * a, 3.0 * a):  # anti-parallel and parallel: no arc, lerp
        torch.testing.assert_close(slerp(a, other, 0.25), 0.75 * a + 0.25 * other, atol=1e-12, rtol=0)


def test_cli_writes_one_strip(micro_vae, small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.common, "resolve_model", lambda spec, **kw: micro_vae)
    pa, pb = tmp_path / "a.png", tmp_path / "b.png"
    small[0].save(pa)
    small[3].resize((40, 24)).save(pb)
    out = tmp_path / "strip.png"
    assert cli.main(["interpolate", "micro", str(pa), str(pb), "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 32 + 2 * 4, 32)
    assert "B (40x24) resized and centre-cropped to A's size 32x32" in capsys.readouterr().out
    assert cli.main(["interpolate", "micro", str(pa), str(pb), "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "at least 2" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
