"""The trainer: the LDM autoencoder objective on accelerate, resumable by running the same command.

The loop reads in order: lr, eval/checkpoint, forward, loss, backward, step, log. Every random
draw (data order, crops, posterior noise) is keyed by (seed, step), so a run killed at any point and
started again from its last checkpoint reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader

from . import api
from .checkpoint import load_latest, save_checkpoint
from .config import Config, load_config
from .data import ImageFolder, StreamSampler, collate
from .losses import AutoencoderObjective
from .run_log import RunLog

log = logging.getLogger("kl_autoencoder")


class AutoencoderStep(nn.Module):
    """One forward pass for training: images -> (reconstruction, posterior mean, log-variance).

    Wrapping encoder and decoder in one module lets accelerate/DDP see a single forward.
    """

    def __init__(self, vae: nn.Module, decoder_only: bool = False):
        super().__init__()
        self.vae, self.decoder_only = vae, decoder_only

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vae = self.vae
        with torch.no_grad() if self.decoder_only else contextlib.nullcontext():
            h = vae.encoder(x)  # (B, 2C, H/8, W/8)
            moments = vae.quant_conv(h) if vae.quant_conv is not None else h
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # diffusers DiagonalGaussianDistribution
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z), mean, logvar  # (B, 3, H, W), (B, C, h, w) x2


def learning_rate(cfg: Config, step: int, world_size: int) -> float:
    t = cfg.train
    lr = t.lr * (t.grad_accum * world_size * t.batch_size if t.scale_lr else 1)  # LDM main.py scale_lr
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr


def _noise(shape: tuple[int, ...], seed: int, step: int, rank: int, micro: int) -> torch.Tensor:
    """Posterior noise keyed by each sample's place in the global batch: N processes with batch b draw
    exactly what one process with batch N*b draws."""
    b = shape[0]
    draws = []
    for j in range(b):
        g = torch.Generator().manual_seed(hash((seed, step, micro, rank * b + j)) & (2**63 - 1))
        draws.append(torch.randn(shape[1:], generator=g))
    return torch.stack(draws)  # (b, C, h, w)


def _build_model(cfg: Config) -> nn.Module:
    if cfg.train.init_from:
        vae = api.load(cfg.train.init_from)
        log.info("fine-tuning %s", cfg.train.init_from)
    else:
        vae = api.create(cfg)
    return vae.train()


def train(cfg: Config, data: str | Path | list, output: str | Path, *, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train (or resume) into ``output``; returns the final status dict. ``data``: image folder(s)."""
    t = cfg.train
    # cpu=True on a machine without CUDA: under `accelerate launch --multi_gpu` (torchrun) that makes
    # accelerate join the processes with gloo (MULTI_CPU) instead of running N unconnected copies
    acc = accelerator or Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    run = RunLog(output, cfg, is_main=acc.is_main_process, world_size=acc.num_processes)
    torch.manual_seed(t.seed)

    # ---- model, objective, optimisers (LPIPS weights are checked here, before any training)
    vae = _build_model(cfg)
    objective = AutoencoderObjective(cfg.loss, vae.config.in_channels)
    if t.decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if t.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    g_params = [p for p in vae.parameters() if p.requires_grad] + ([objective.logvar] if cfg.loss.learn_logvar else [])
    opt_g = torch.optim.Adam(g_params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    opt_d = torch.optim.Adam(objective.discriminator.parameters(), lr=t.disc_lr or t.lr, betas=t.betas)
    disc_lr_ratio = (t.disc_lr / t.lr) if t.disc_lr and t.lr else 1.0  # the discriminator follows the same schedule
    ema = None
    if t.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(vae.parameters(), decay=t.ema_decay)

    # ---- resume: the same command again continues from the newest checkpoint
    step = 0
    resumed = load_latest(output)
    if resumed:
        path, ck = resumed
        vae.load_state_dict(ck["vae"])
        objective.discriminator.load_state_dict(ck["discriminator"])
        objective.logvar.data.copy_(ck["logvar"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["rng_cpu"])
        step = int(ck["step"])
        run.restore(ck["run"])
        log.info("resumed from %s at step %d", path, step)

    model = AutoencoderStep(vae, t.decoder_only)
    model, disc, opt_g, opt_d = acc.prepare(model, objective.discriminator, opt_g, opt_d)
    objective.to(acc.device)
    if ema is not None:
        ema.to(acc.device)
    last_layer = vae.decoder.conv_out.weight  # LDM: adaptive GAN weight at the decoder's last layer

    # ---- data: this process's slice of each global batch, from the resumed position
    dataset = ImageFolder(data, cfg.data.crop_size, random_flip=cfg.data.random_flip, small_images=cfg.data.small_images,
                          min_size=cfg.data.min_size, resize=cfg.data.resize, seed=t.seed)
    sampler = StreamSampler(len(dataset), t.batch_size, seed=t.seed, rank=acc.process_index,
                            world_size=acc.num_processes, start_micro=step * t.grad_accum)
    loader = iter(DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=collate,
                             num_workers=t.num_workers, persistent_workers=t.num_workers > 0))
    val = run.validation_set(cfg)
    latent_shape = (t.batch_size, vae.config.latent_channels) + (cfg.data.crop_size // api.downsample_factor(vae),) * 2

    start_time, start_step = time.time(), step
    deadline = start_time + 60 * t.max_minutes if t.max_minutes else None
    run.open_progress(step, t.max_steps)
    while step < t.max_steps:
        # ---- lr
        lr = learning_rate(cfg, step, acc.num_processes)
        for group in opt_g.param_groups:
            group["lr"] = lr
        for group in opt_d.param_groups:
            group["lr"] = lr * disc_lr_ratio

        # ---- eval / checkpoint (before the step, so step 0 is evaluated and a resumed step is not re-saved)
        if step % t.eval_every == 0 and val is not None and acc.is_main_process:
            with _ema_weights(ema, vae):
                run.evaluate(vae, val, step)
        if step > start_step and step % t.checkpoint_every == 0:
            _checkpoint(acc, run, output, step, vae, objective, opt_g, opt_d, ema, t.keep_checkpoints)
        if deadline and time.time() > deadline:
            log.info("--max-minutes reached at step %d", step)
            break

        # ---- forward, loss, backward (generator / autoencoder)
        gan = objective.gan_active(step)
        objective.discriminator.requires_grad_(False)  # the generator step must not touch D's .grad
        opt_g.zero_grad(set_to_none=True)
        pairs, parts, finite = [], [], True
        for micro in range(t.grad_accum):
            batch = next(loader)
            run.note_files(batch)
            x = batch["pixels"].to(acc.device)  # (b, 3, crop, crop) in [-1, 1]
            noise = _noise(latent_shape, t.seed, step, acc.process_index, micro) if cfg.loss.sample_posterior else None
            sync = acc.no_sync(model) if micro < t.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    xrec, mean, logvar = model(x, noise)
                out = objective.generator_loss(x, xrec, mean, logvar, step, last_layer,
                                               discriminator=acc.unwrap_model(disc))
                finite = finite and bool(torch.isfinite(out.loss))
                if finite:
                    acc.backward(out.loss / t.grad_accum)
            pairs.append((x, xrec.detach()))
            parts.append(out._replace(loss=out.loss.detach(), d_weight=out.d_weight.detach()))

        # ---- step (all processes agree to skip a non-finite loss, so DDP stays in lockstep)
        all_finite = bool(acc.gather(torch.tensor([int(finite)], device=acc.device)).min() == 1)
        if not all_finite:
            opt_g.zero_grad(set_to_none=True)
            run.skipped_nonfinite += 1
            log.warning("non-finite loss at step %d: step skipped (%d so far)", step, run.skipped_nonfinite)
        else:
            if t.grad_clip:
                acc.clip_grad_norm_(g_params, t.grad_clip)
            opt_g.step()
            if ema is not None:
                ema.step(vae.parameters())
        d_loss = torch.zeros(())
        if gan and all_finite:  # discriminator on detached reconstructions: the autoencoder's .grad is untouched
            objective.discriminator.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            for micro, (x, xrec) in enumerate(pairs):
                with acc.no_sync(disc) if micro < len(pairs) - 1 else contextlib.nullcontext():
                    with acc.autocast():
                        d_loss = objective.discriminator_loss(x, xrec, step, discriminator=disc)
                    acc.backward(d_loss / t.grad_accum)
            opt_d.step()

        # ---- log
        step += 1
        run.images_seen += run.images_per_step
        run.log_step(step, parts, d_loss, lr, time.time() - start_time, step - start_step, pairs[0] if step % t.image_every == 0 else None)

    _checkpoint(acc, run, output, step, vae, objective, opt_g, opt_d, ema, t.keep_checkpoints)
    if acc.is_main_process:
        with _ema_weights(ema, vae):
            if val is not None:
                run.evaluate(vae, val, step)
            run.export(vae, Path(output) / "export", time.time() - start_time)
    acc.wait_for_everyone()
    run.close()
    return run.status()


@contextlib.contextmanager
def _ema_weights(ema: Any, vae: nn.Module):
    """Evaluate and export with the EMA weights when there are any, then put the live weights back."""
    if ema is None:
        yield
        return
    ema.store(vae.parameters())
    ema.copy_to(vae.parameters())
    try:
        yield
    finally:
        ema.restore(vae.parameters())


def _checkpoint(acc: Accelerator, run: RunLog, output: str | Path, step: int, vae: nn.Module, objective: AutoencoderObjective,
                opt_g: Any, opt_d: Any, ema: Any, keep: int) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "step": step,
            "vae": vae.state_dict(),
            "discriminator": objective.discriminator.state_dict(),
            "logvar": objective.logvar.detach().clone(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "run": run.state(),  # counters; the data position is step * grad_accum micro-batches
            "config": run.config_yaml,
        }
        path = save_checkpoint(output, step, state, keep)
        run.saved(path, step)
    acc.wait_for_everyone()


def main_train(config: str, data: list[str], output: str, overrides: list[str], max_steps: int | None, max_minutes: float | None, dry_run: bool) -> int:
    """The `kl-autoencoder train` command."""
    if max_steps is not None:
        overrides = [*overrides, f"train.max_steps={max_steps}"]
    if max_minutes is not None:
        overrides = [*overrides, f"train.max_minutes={max_minutes}"]
    cfg = load_config(config, overrides)
    if dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    status = train(cfg, data, output)
    print(f"done: step {status['step']}, {status['images_seen']} images seen; model in {Path(output) / 'export'}")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a VAE (resumes when run again)",
        description="Train a KL-VAE with the LDM objective (L1/L2 + LPIPS + KL + PatchGAN) from a preset or YAML "
        "config on a folder of images. Running the same command again resumes from the newest checkpoint in "
        "RUN_DIR. Works under `accelerate launch` for several processes/GPUs/nodes. At the end RUN_DIR/export/ "
        "holds a diffusers folder (EMA weights when EMA is on). LPIPS needs torchvision's vgg16-397923af.pth in "
        "$TORCH_HOME/hub/checkpoints (or --set loss.lpips_weights=PATH, or --set loss.perceptual=none).",
    )
    p.add_argument("config", metavar="CONFIG", help="preset name (tiny-kl-f8, sd-kl-f8, ldm-kl-f8, ...) or YAML path")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR", help="folder(s) of training images (recursive: jpg, png, webp, bmp, tiff)")
    p.add_argument("--output", required=True, metavar="RUN_DIR", help="run directory: config.yaml, status.json, checkpoints/, export/")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (overrides train.max_steps)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (checkpoint + export) after this many minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 --set loss.perceptual=none (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=lambda a: main_train(a.config, a.data, a.output, a.overrides, a.max_steps, a.max_minutes, a.dry_run))
