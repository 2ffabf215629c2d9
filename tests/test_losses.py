"""The LDM objective against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

import kl_autoencoder as ka
from kl_autoencoder.config import LossConfig
from kl_autoencoder.model import kl_divergence
from kl_autoencoder.training.losses import AutoencoderObjective, NLayerDiscriminator, build_lpips, hinge_d_loss, vanilla_d_loss
from kl_autoencoder.training.step import AutoencoderStep

from conftest import MICRO, perturb


def _setup(disc_start=0, **kw):
    vae = perturb(ka.create(MICRO)).train()
    obj = AutoencoderObjective(LossConfig(perceptual="lpips-vgg", lpips_weights="random", disc_start=disc_start, disc_norm="group", **kw))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    xrec, mean, logvar = AutoencoderStep(vae)(x, None)
    return vae, obj, x, xrec, mean, logvar


def test_kl_matches_closed_form():
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    torch.testing.assert_close(kl_divergence(mean, logvar), ref)
    # and diffusers' own posterior agrees
    torch.testing.assert_close(kl_divergence(mean, logvar), DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl())


def test_adaptive_weight_equals_hand_computation():
    vae, obj, x, xrec, mean, logvar = _setup(disc_start=0, disc_weight=0.5)
    last = vae.decoder.conv_out.weight
    out = obj.generator_loss(x, xrec, mean, logvar, step=5, last_layer=last)
    # by hand: gradients of the NLL and the GAN loss at the last layer, via .backward into .grad
    nll = ((x - xrec).abs() + obj.lpips(x, xrec)).sum() / x.shape[0]  # logvar = 0
    g = -obj.discriminator(xrec).mean()
    last.grad = None
    nll.backward(retain_graph=True)
    n1 = last.grad.norm()
    last.grad = None
    g.backward(retain_graph=True)
    n2 = last.grad.norm()
    expected = torch.clamp(n1 / (n2 + 1e-4), 0, 1e4) * 0.5
    torch.testing.assert_close(out.d_weight, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.nll, nll.detach(), rtol=1e-5, atol=0)
    assert float(out.g) == pytest.approx(float(g.detach()), rel=1e-5)


def test_no_gan_term_before_disc_start():
    vae, obj, x, xrec, mean, logvar = _setup(disc_start=100)
    calls = []
    obj.discriminator.register_forward_hook(lambda *a: calls.append(1))
    out = obj.generator_loss(x, xrec, mean, logvar, step=99, last_layer=vae.decoder.conv_out.weight)
    assert calls == [] and float(out.g) == 0.0 and float(out.d_weight) == 0.0
    expected = out.nll + 1e-6 * kl_divergence(mean, logvar).mean()
    torch.testing.assert_close(out.loss, expected)
    assert float(obj.discriminator_loss(x, xrec, step=99)) == 0.0 and calls == []
    out = obj.generator_loss(x, xrec, mean, logvar, step=100, last_layer=vae.decoder.conv_out.weight)
    assert calls and float(out.d_weight) > 0


def test_discriminator_step_leaves_autoencoder_grads_untouched():
    vae, obj, x, xrec, mean, logvar = _setup(disc_start=0)
    obj.discriminator.requires_grad_(False)
    out = obj.generator_loss(x, xrec, mean, logvar, step=1, last_layer=vae.decoder.conv_out.weight)
    out.loss.backward(retain_graph=True)
    assert all(p.grad is None for p in obj.discriminator.parameters())  # G step: D's .grad untouched
    before = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    assert before
    obj.discriminator.requires_grad_(True)
    d = obj.discriminator_loss(x, xrec, step=1)
    d.backward()
    for n, p in vae.named_parameters():
        if n in before:
            assert torch.equal(p.grad, before[n]), n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.discriminator.parameters())


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_colour_weight_adds_the_mean_colour_error_again(kind):
    """loss.colour_weight w: a per-channel colour cast c costs (1 + w) * H * W * sum_c c^2 (L2; L1: |c| and
    its per-pixel L1), a zero-mean change costs what it did without the term; by hand, not by our helper."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    cast = torch.tensor([[0.03, -0.02, 0.01], [-0.05, 0.0, 0.04]]).view(2, 3, 1, 1)  # (B, 3, 1, 1)
    mean, logvar = torch.zeros(2, 4, 2, 3), torch.zeros(2, 4, 2, 3)

    def nll(xrec, w):
        obj = AutoencoderObjective(LossConfig(reconstruction=kind, perceptual="none", colour_weight=w))
        return obj.generator_loss(x, xrec, mean, logvar, step=0, last_layer=None).nll

    hw = 16 * 24
    per_image = cast.pow(2).sum((1, 2, 3)) if kind == "l2" else cast.abs().sum((1, 2, 3))  # (B,)
    torch.testing.assert_close(nll(x + cast, 3.0), (1 + 3.0) * hw * per_image.mean())
    noise = torch.randn(x.shape, generator=g) * 0.1
    noise = noise - noise.mean(dim=(2, 3), keepdim=True)  # every channel's mean unchanged
    torch.testing.assert_close(nll(x + noise, 3.0), nll(x + noise, 0.0))
    assert float(nll(x + noise + cast, 3.0)) > float(nll(x + noise + cast, 0.0))


def test_gan_losses_by_hand():
    r, f = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    torch.testing.assert_close(hinge_d_loss(r, f), 0.5 * (torch.clamp(1 - r, min=0).mean() + torch.clamp(1 + f, min=0).mean()))
    torch.testing.assert_close(vanilla_d_loss(r, f), 0.5 * (-F.logsigmoid(r).mean() - F.logsigmoid(-f).mean()))


def test_patchgan_layout_and_init():
    d = NLayerDiscriminator(3, 64, 3, "batch")
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.bias is None for c in convs[1:4])  # no bias before BatchNorm
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert d(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 14, 14)


def test_lpips_missing_weights_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        build_lpips("lpips-vgg")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg and "loss.perceptual=none" in msg


def test_lpips_loads_backbone_from_local_file(tmp_path, monkeypatch):
    import torchvision

    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    tv = torchvision.models.vgg16()
    torch.save(tv.state_dict(), ckpt / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_lpips("lpips-vgg")
    # every conv of lpips' VGG slices holds the file's weights (features.28 is the last conv)
    torch.testing.assert_close(model.net.slice1._modules["0"].weight, tv.features[0].weight)
    torch.testing.assert_close(model.net.slice5._modules["28"].weight, tv.features[28].weight)
    assert not any(p.requires_grad for p in model.parameters())
