"""The LDM autoencoder objective: reconstruction + LPIPS + KL + PatchGAN.

Semantics follow CompVis latent-diffusion ``ldm/modules/losses/contperceptual.py``
(LPIPSWithDiscriminator) and taming-transformers ``discriminator/model.py`` (NLayerDiscriminator):
per-pixel losses are summed over pixels and averaged over the batch, the GAN term is off before
``disc_start``, and the generator weight is adapted at the decoder's last layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LossConfig
from ..evaluation.lpips import LPIPS_BACKBONE_FILES
from ..evaluation.lpips import build_lpips as _build_lpips
from ..model import kl_divergence

_NETS = {"lpips-vgg": "vgg", "lpips-alex": "alex"}


def build_lpips(kind: str = "lpips-vgg", weights: str | None = None) -> nn.Module:
    """The frozen LPIPS of the loss (``evaluation/lpips.py``); a missing backbone file says how to go on."""
    name = LPIPS_BACKBONE_FILES[_NETS[kind]]
    fix = f" (or set loss.lpips_weights=/path/to/{name}), or train without it: --set loss.perceptual=none"
    return _build_lpips(_NETS[kind], weights, fix=fix)


# ----------------------------------------------------------------------------- discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming-transformers discriminator/model.py)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c), c)
            return nn.Identity()

        use_bias = norm != "batch"  # taming: no conv bias before BatchNorm
        kw, padw = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kw, 2, padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, 2, padw, bias=use_bias), norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, 1, padw, bias=use_bias), norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, kw, 1, padw)]  # (B, 1, h, w) patch logits
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _weights_init(m: nn.Module) -> None:
    # taming discriminator/model.py weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


# ----------------------------------------------------------------------------- pieces


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """LDM contperceptual.py calculate_adaptive_weight: ||grad nll|| / (||grad g|| + 1e-4), clamped, in fp32."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0].float()
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].float()
    d_weight = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


def mean_colour_error(x: torch.Tensor, xrec: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Each image's per-channel mean error, in the per-pixel loss's units summed over the pixels: (B,).

    Why (issue 18): a per-pixel L2 sees an image's mean-colour error only as its DC share,
    H * W * sum_c (mean_c(xrec) - mean_c(x))^2 (Parseval), a few percent of the loss at 25 dB, so a
    colour cast of 3 levels costs little; ``loss.colour_weight`` w adds w times that share again
    (L1: H * W * sum_c |mean error|), so the objective weighs the mean colour (1 + w) times.
    """
    dc = (xrec - x).mean(dim=(2, 3))  # (B, C) per-channel mean error
    per_pixel = dc.pow(2) if kind == "l2" else dc.abs()
    return per_pixel.sum(1) * (x.shape[2] * x.shape[3])


class GeneratorLoss(NamedTuple):
    loss: torch.Tensor  # what the autoencoder optimiser minimises
    rec: torch.Tensor  # mean per-pixel reconstruction error (L1 or L2), for logging
    perceptual: torch.Tensor  # mean LPIPS
    nll: torch.Tensor
    kl: torch.Tensor  # mean per-sample KL (summed over latent elements)
    g: torch.Tensor  # generator GAN loss (0 before disc_start)
    d_weight: torch.Tensor


class AutoencoderObjective(nn.Module):
    """LPIPSWithDiscriminator: holds LPIPS, the learned log-variance and the discriminator."""

    def __init__(self, cfg: LossConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.lpips = build_lpips(cfg.perceptual, cfg.lpips_weights) if cfg.perceptual != "none" else None
        # LDM: a learned scalar log-variance of the decoder likelihood (frozen unless learn_logvar)
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        self.discriminator = NLayerDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)
        self._d_loss = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def gan_active(self, step: int) -> bool:
        """LDM adopt_weight: the GAN factor is 0 while global_step < disc_start."""
        return self.cfg.disc_factor > 0 and step >= self.cfg.disc_start

    def kl_weight(self, step: int) -> float:
        w = self.cfg.kl_warmup_steps
        return self.cfg.kl_weight * (min(1.0, step / w) if w > 0 else 1.0)

    def generator_loss(
        self,
        x: torch.Tensor,
        xrec: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None,
        discriminator: nn.Module | None = None,
    ) -> GeneratorLoss:
        """x, xrec: images in [-1, 1], (B, 3, H, W); mean, logvar: posterior moments (B, C, h, w).

        ``discriminator``: the module to score ``xrec`` with (default: ours); its parameters should
        not require grad here, so the generator step leaves the discriminator's ``.grad`` alone.
        """
        x, xrec = x.float(), xrec.float()
        b = x.shape[0]
        if self.cfg.reconstruction == "l1":
            rec = (x - xrec).abs()  # (B, 3, H, W)
        else:
            rec = (x - xrec).pow(2)
        rec_total = rec
        p_loss = torch.zeros((), device=x.device)
        if self.lpips is not None and self.cfg.perceptual_weight > 0:
            p = self.lpips(x.contiguous(), xrec.contiguous())  # (B, 1, 1, 1); inputs in [-1, 1]
            p_loss = p.mean()
            rec_total = rec + self.cfg.perceptual_weight * p
        nll = rec_total / torch.exp(self.logvar) + self.logvar  # LDM: summed over pixels, averaged over batch
        nll_loss = nll.sum() / b
        if self.cfg.colour_weight > 0:
            nll_loss = nll_loss + self.cfg.colour_weight * mean_colour_error(x, xrec, self.cfg.reconstruction).mean() / torch.exp(self.logvar)
        kl_loss = kl_divergence(mean.float(), logvar.float()).mean()
        loss = nll_loss + self.kl_weight(step) * kl_loss
        g_loss = torch.zeros((), device=x.device)
        d_weight = torch.zeros((), device=x.device)
        if self.gan_active(step):
            disc = discriminator if discriminator is not None else self.discriminator
            g_loss = -disc(xrec.contiguous()).float().mean()
            if self.cfg.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.cfg.disc_weight)
            else:
                d_weight = torch.tensor(self.cfg.disc_weight, device=x.device)
            loss = loss + d_weight * self.cfg.disc_factor * g_loss
        return GeneratorLoss(loss, rec.mean().detach(), p_loss.detach(), nll_loss.detach(), kl_loss.detach(), g_loss.detach(), d_weight)

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor, step: int, discriminator: nn.Module | None = None) -> torch.Tensor:
        """The PatchGAN loss on real ``x`` and detached ``xrec``; zero before disc_start."""
        if not self.gan_active(step):
            return torch.zeros((), device=x.device)
        disc = discriminator if discriminator is not None else self.discriminator
        # LDM: two separate passes, so BatchNorm normalises real and fake batches on their own
        logits_real = disc(x.detach().contiguous()).float()
        logits_fake = disc(xrec.detach().contiguous()).float()
        return self.cfg.disc_factor * self._d_loss(logits_real, logits_fake)
