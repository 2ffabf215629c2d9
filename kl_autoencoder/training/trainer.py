"""The trainer: the LDM autoencoder objective on accelerate, resumable by running the same command.

``train()`` reads top to bottom: set-up, resume, data, then the loop (lr, eval/checkpoint, generator
step, discriminator step, log), then the final checkpoint and export. Every random draw (data order,
crops, posterior noise) is keyed by (seed, step), so a run killed at any point and started again from
its last checkpoint reproduces the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..convert import export, load
from ..model import create, downsample_factor
from ..utils.locks import output_lock
from .checkpoints import load_latest, save_checkpoint
from .data import ImageFolder, StreamSampler, collate
from .losses import AutoencoderObjective
from .run_log import RunLog
from .step import AutoencoderStep, posterior_noise
from .validation import validate, validation_set

log = logging.getLogger("kl_autoencoder")


@dataclass
class _Parts:
    """Everything a checkpoint holds besides the counters: model, objective, optimisers, EMA."""

    vae: nn.Module
    objective: AutoencoderObjective
    g_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: Any


def learning_rate(cfg: Config, step: int, world_size: int) -> float:
    t = cfg.train
    lr = t.lr * (t.grad_accum * world_size * t.batch_size if t.scale_lr else 1)  # LDM main.py scale_lr
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr


def _build(cfg: Config) -> _Parts:
    """Model (fresh or ``train.init_from``), objective (LPIPS weights are checked here, before any training),
    optimisers and EMA."""
    t = cfg.train
    vae = load(t.init_from) if t.init_from else create(cfg)
    if t.init_from:
        log.info("fine-tuning %s", t.init_from)
    vae.train()
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
    ema = None
    if t.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(vae.parameters(), decay=t.ema_decay)
    return _Parts(vae, objective, g_params, opt_g, opt_d, ema)


def _resume(parts: _Parts, output: str | Path, run: RunLog) -> int:
    """Load the newest checkpoint in ``output`` into ``parts`` and ``run``; returns its step (0 if none)."""
    resumed = load_latest(output)
    if not resumed:
        return 0
    path, ck = resumed
    parts.vae.load_state_dict(ck["vae"])
    parts.objective.discriminator.load_state_dict(ck["discriminator"])
    parts.objective.logvar.data.copy_(ck["logvar"])
    parts.opt_g.load_state_dict(ck["opt_g"])
    parts.opt_d.load_state_dict(ck["opt_d"])
    if parts.ema is not None:
        parts.ema.load_state_dict(ck["ema"])
    torch.set_rng_state(ck["rng_cpu"])
    run.restore(ck["run"])
    log.info("resumed from %s at step %d", path, int(ck["step"]))
    return int(ck["step"])


def _loader(cfg: Config, data: str | Path | list, acc: Accelerator, step: int) -> Any:
    """This process's slice of each global batch, from the resumed position, as an endless iterator."""
    t = cfg.train
    dataset = ImageFolder(data, cfg.data.crop_size, random_flip=cfg.data.random_flip, small_images=cfg.data.small_images,
                          min_size=cfg.data.min_size, resize=cfg.data.resize, seed=t.seed, crop_sizes=cfg.data.crop_sizes)
    sampler = StreamSampler(len(dataset), t.batch_size, seed=t.seed, rank=acc.process_index,
                            world_size=acc.num_processes, start_micro=step * t.grad_accum)
    return iter(DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=collate,
                           num_workers=t.num_workers, persistent_workers=t.num_workers > 0))


def _set_lr(cfg: Config, parts: _Parts, step: int, world_size: int) -> float:
    lr = learning_rate(cfg, step, world_size)
    ratio = (cfg.train.disc_lr / cfg.train.lr) if cfg.train.disc_lr and cfg.train.lr else 1.0  # D follows the schedule
    for group in parts.opt_g.param_groups:
        group["lr"] = lr
    for group in parts.opt_d.param_groups:
        group["lr"] = lr * ratio
    return lr


def _generator_pass(cfg: Config, acc: Accelerator, run: RunLog, parts: _Parts, model: nn.Module, disc: nn.Module,
                    loader: Any, step: int) -> tuple[list, list, bool]:
    """Forward, loss and backward of every micro-batch; returns (image pairs, loss parts, all finite here)."""
    t = cfg.train
    vae = parts.vae
    last_layer = vae.decoder.conv_out.weight  # LDM: adaptive GAN weight at the decoder's last layer
    parts.objective.discriminator.requires_grad_(False)  # the generator step must not touch D's .grad
    parts.opt_g.zero_grad(set_to_none=True)
    pairs, losses, finite = [], [], True
    for micro in range(t.grad_accum):
        batch = next(loader)
        run.note_files(batch)
        x = batch["pixels"].to(acc.device)  # (b, 3, crop, crop) in [-1, 1]; crop may change per micro-batch
        latent_shape = (x.shape[0], vae.config.latent_channels) + tuple(s // downsample_factor(vae) for s in x.shape[2:])
        noise = posterior_noise(latent_shape, t.seed, step, acc.process_index, micro, acc.device) if cfg.loss.sample_posterior else None
        sync = acc.no_sync(model) if micro < t.grad_accum - 1 else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                xrec, mean, logvar = model(x, noise)
            out = parts.objective.generator_loss(x, xrec, mean, logvar, step, last_layer, discriminator=acc.unwrap_model(disc))
            finite = finite and bool(torch.isfinite(out.loss))
            if finite:
                acc.backward(out.loss / t.grad_accum)
        pairs.append((x, xrec.detach()))
        losses.append(out._replace(loss=out.loss.detach(), d_weight=out.d_weight.detach()))
    return pairs, losses, finite


def _discriminator_step(cfg: Config, acc: Accelerator, parts: _Parts, disc: nn.Module, pairs: list, step: int) -> torch.Tensor:
    """The PatchGAN update on detached reconstructions: the autoencoder's .grad is untouched."""
    parts.objective.discriminator.requires_grad_(True)
    parts.opt_d.zero_grad(set_to_none=True)
    d_loss = torch.zeros(())
    for micro, (x, xrec) in enumerate(pairs):
        with acc.no_sync(disc) if micro < len(pairs) - 1 else contextlib.nullcontext():
            with acc.autocast():
                d_loss = parts.objective.discriminator_loss(x, xrec, step, discriminator=disc)
            acc.backward(d_loss / cfg.train.grad_accum)
    parts.opt_d.step()
    return d_loss


def train(cfg: Config, data: str | Path | list, output: str | Path, *, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train (or resume) into ``output``; returns the final status dict. ``data``: image folder(s).

    The main process holds ``output``'s lock for the whole run: a second trainer there is refused.
    """
    t = cfg.train
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps}: must be >= 1 (the number of optimiser steps)")
    # cpu=True on a machine without CUDA: under `accelerate launch --multi_gpu` (torchrun) that makes
    # accelerate join the processes with gloo (MULTI_CPU) instead of running N unconnected copies
    acc = accelerator or Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
    with output_lock(output, "train") if acc.is_main_process else contextlib.nullcontext():
        return _train(cfg, data, output, acc)


def _train(cfg: Config, data: str | Path | list, output: str | Path, acc: Accelerator) -> dict[str, Any]:
    """The run itself, top to bottom."""
    t = cfg.train
    run = RunLog(output, cfg, is_main=acc.is_main_process, world_size=acc.num_processes)
    torch.manual_seed(t.seed)
    if t.deterministic:
        _deterministic_kernels()

    # ---- model, objective, optimisers; resume: the same command again continues from the newest checkpoint
    parts = _build(cfg)
    step = _resume(parts, output, run)
    model, disc, parts.opt_g, parts.opt_d = acc.prepare(AutoencoderStep(parts.vae, t.decoder_only),
                                                        parts.objective.discriminator, parts.opt_g, parts.opt_d)
    parts.objective.to(acc.device)
    if parts.ema is not None:
        parts.ema.to(acc.device)
    loader = _loader(cfg, data, acc, step)
    val = validation_set(cfg)

    start_time, start_step = time.time(), step
    deadline = start_time + 60 * t.max_minutes if t.max_minutes else None
    run.open_progress(step, t.max_steps)
    while step < t.max_steps:
        lr = _set_lr(cfg, parts, step, acc.num_processes)

        # ---- eval / checkpoint (before the step, so step 0 is evaluated and a resumed step is not re-saved)
        if step % t.eval_every == 0 and val is not None and acc.is_main_process:
            with _ema_weights(parts.ema, parts.vae):
                run.record_validation(validate(parts.vae, val, step))
        if step > start_step and step % t.checkpoint_every == 0:
            _checkpoint(acc, run, output, step, parts, t.keep_checkpoints)
        if deadline and time.time() > deadline:
            log.info("--max-minutes reached at step %d", step)
            break

        # ---- generator (autoencoder) step; all processes agree to skip a non-finite loss, so DDP stays in lockstep
        pairs, losses, finite = _generator_pass(cfg, acc, run, parts, model, disc, loader, step)
        all_finite = bool(acc.gather(torch.tensor([int(finite)], device=acc.device)).min() == 1)
        if not all_finite:
            parts.opt_g.zero_grad(set_to_none=True)
            run.skipped_nonfinite += 1
            log.warning("non-finite loss at step %d: step skipped (%d so far)", step, run.skipped_nonfinite)
        else:
            if t.grad_clip:
                acc.clip_grad_norm_(parts.g_params, t.grad_clip)
            parts.opt_g.step()
            if parts.ema is not None:
                parts.ema.step(parts.vae.parameters())

        # ---- discriminator step
        gan = parts.objective.gan_active(step) and all_finite
        d_loss = _discriminator_step(cfg, acc, parts, disc, pairs, step) if gan else torch.zeros(())

        # ---- log
        step += 1
        run.images_seen += run.images_per_step
        run.log_step(step, losses, d_loss, lr, time.time() - start_time, step - start_step,
                     pairs[0] if step % t.image_every == 0 else None)

    _checkpoint(acc, run, output, step, parts, t.keep_checkpoints)
    if acc.is_main_process:
        with _ema_weights(parts.ema if t.export_ema else None, parts.vae):  # the weights exported are the ones validated
            if val is not None:
                run.record_validation(validate(parts.vae, val, step))
            export(parts.vae, Path(output) / "export", notes=run.export_notes(time.time() - start_time), name=cfg.name,
                   force=True)  # the run's own export: replaced at every finish
            log.info("exported %s", Path(output) / "export")
    acc.wait_for_everyone()
    run.close()
    return run.status()


def _deterministic_kernels() -> None:
    """Bitwise-repeatable GPU steps, so a resumed run equals an uninterrupted one on a GPU as on a CPU.

    PyTorch "Reproducibility" notes: cuDNN's autotuner and some CUDA kernels (atomicAdd-based backward of
    nearest upsampling, scatter-adds) are nondeterministic; ``use_deterministic_algorithms`` picks the
    deterministic ones (warning where none exists) and cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG``.
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def _ema_weights(ema: Any, vae: nn.Module):
    """Evaluate (and export) with the EMA weights when there are any, then put the live weights back."""
    if ema is None:
        yield
        return
    ema.store(vae.parameters())
    ema.copy_to(vae.parameters())
    try:
        yield
    finally:
        ema.restore(vae.parameters())


def _checkpoint(acc: Accelerator, run: RunLog, output: str | Path, step: int, parts: _Parts, keep: int) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "step": step,
            "vae": parts.vae.state_dict(),
            "discriminator": parts.objective.discriminator.state_dict(),
            "logvar": parts.objective.logvar.detach().clone(),
            "opt_g": parts.opt_g.state_dict(),
            "opt_d": parts.opt_d.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "run": run.state(),  # counters; the data position is step * grad_accum micro-batches
            "config": run.config_yaml,
        }
        path = save_checkpoint(output, step, state, keep)
        run.saved(path, step)
    acc.wait_for_everyone()
