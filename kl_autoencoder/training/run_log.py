"""A training run's directory: resolved config, status.json, progress bar, TensorBoard, sample images.

Only the main process writes; other processes get a RunLog that counts but writes nothing.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, ConfigError
from ..utils.files import save_json, write_text
from ..utils.images import save_grid, tensor_to_pil

log = logging.getLogger("kl_autoencoder")

# Settings a resumed run may change; anything else must match the run directory's config.yaml.
# export_ema: only what the export holds; training itself is the same.
_RESUMABLE_CHANGES = {"max_steps", "max_minutes", "log_every", "image_every", "eval_every", "checkpoint_every",
                      "keep_checkpoints", "num_workers", "export_ema"}


class RunLog:
    def __init__(self, output: str | Path, cfg: Config, is_main: bool = True, world_size: int = 1):
        self.dir, self.cfg, self.is_main = Path(output), cfg, is_main
        self.images_per_step = cfg.train.batch_size * cfg.train.grad_accum * world_size
        self._step = 0
        self.config_yaml = cfg.to_yaml()
        self.images_seen = self.skipped_nonfinite = 0
        self.bad_files: dict[str, str] = {}
        self.upscaled: set[str] = set()
        self.last: dict[str, float] = {}
        self.wall_before = 0.0  # seconds trained by earlier invocations of this run
        self.wall_s = 0.0
        self.val: dict[str, float] = {}
        self._bar = self._tb = None
        self._saved_at = 0.0
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._check_config()
            write_text(self.dir / "config.yaml", self.config_yaml)

    def _check_config(self) -> None:
        old_path = self.dir / "config.yaml"
        if not old_path.is_file():
            return
        old, new, defaults = yaml.safe_load(old_path.read_text()) or {}, self.cfg.to_dict(), Config().to_dict()
        # a key the old config.yaml lacks was added to the schema since: its default is what that run used
        was = lambda section, k: old.get(section, {}).get(k, defaults[section][k])  # noqa: E731
        diffs = [
            f"{section}.{k}: {was(section, k)!r} -> {v!r}"
            for section, values in new.items() if isinstance(values, dict)
            for k, v in values.items()
            if was(section, k) != v and not (section == "train" and k in _RESUMABLE_CHANGES)
        ]
        if diffs:
            raise ConfigError(f"{old_path}: this run was started with another config ({'; '.join(diffs[:5])}); "
                             "use a new --output, or the same settings to resume")

    # ---- state carried in checkpoints
    def state(self) -> dict[str, Any]:
        return {"images_seen": self.images_seen, "skipped_nonfinite": self.skipped_nonfinite, "wall_time_s": self.wall_s,
                "bad_files": dict(self.bad_files), "upscaled": sorted(self.upscaled), "last": dict(self.last)}

    def restore(self, s: dict[str, Any]) -> None:
        self.images_seen, self.skipped_nonfinite = int(s["images_seen"]), int(s["skipped_nonfinite"])
        self.bad_files, self.upscaled = dict(s["bad_files"]), set(s["upscaled"])
        self.wall_before = self.wall_s = float(s.get("wall_time_s", 0.0))
        self.last = dict(s.get("last", {}))  # so a finished run run again (e.g. to re-export) still reports them

    def status(self) -> dict[str, Any]:
        return {"step": self._step, "images_seen": self.images_seen, "wall_time_s": round(self.wall_s, 1),
                "skipped_nonfinite": self.skipped_nonfinite,
                "skipped_files": len(self.bad_files), "skipped_file_reasons": self.bad_files,
                "upscaled_files": sorted(self.upscaled), "losses": self.last, "validation": self.val,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}

    # ---- data notes: one warning line per bad file, counted once
    def note_files(self, batch: dict[str, Any]) -> None:
        for msg in batch["failed"]:
            path = msg.split(": ", 1)[0]
            if path not in self.bad_files:
                self.bad_files[path] = msg.split(": ", 1)[-1]
                if self.is_main:
                    log.warning("skipped %s", msg)
        for path in batch["upscaled"]:
            if path not in self.upscaled:
                self.upscaled.add(path)
                if self.is_main:
                    # the batch's own crop: with data.crop_sizes it changes per micro-batch
                    log.warning("upscaled %s: smaller than the %dpx crop (data.small_images=upscale)", path, batch["pixels"].shape[-1])

    # ---- progress
    def open_progress(self, step: int, total: int) -> None:
        self._step = step
        if not self.is_main:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None

    def log_step(self, step: int, parts: list, d_loss: torch.Tensor, lr: float, elapsed: float, steps_done: int,
                 pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self._step = step
        self.wall_s = self.wall_before + elapsed
        if not self.is_main:
            return
        mean = {k: float(sum(getattr(p, k) for p in parts) / len(parts)) for k in ("loss", "rec", "perceptual", "kl", "g")}
        # rates from the end of this invocation's first step: it carries one-off set-up (worker start, allocations)
        if steps_done == 1:
            self._rate_origin = elapsed
        timed_steps, timed_s = steps_done - 1, elapsed - getattr(self, "_rate_origin", 0.0)
        if timed_steps < 1:
            timed_steps, timed_s = steps_done, elapsed
        rate = timed_steps / max(timed_s, 1e-9)
        mean.update(d_loss=float(d_loss), lr=lr, steps_per_s=rate, images_per_s=rate * self.images_per_step)
        self.last = {k: (v if math.isfinite(v) else str(v)) for k, v in mean.items()}
        self._bar.update(1)
        self._bar.set_postfix(rec=f"{mean['rec']:.4f}", kl=f"{mean['kl']:.0f}", g=f"{mean['g']:.3f}",
                              img_s=f"{mean['images_per_s']:.1f}", refresh=False)
        if self._tb is not None:
            for k, v in mean.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if pair is not None:
            x, xrec = pair
            save_grid([tensor_to_pil(x[:4]), tensor_to_pil(xrec[:4].float().clamp(-1, 1))], self.dir / "images" / f"step-{step:08d}.png")
        if step % self.cfg.train.log_every == 0 or time.time() - self._saved_at > 30:
            self.write_status()

    def write_status(self) -> None:
        if self.is_main:
            save_json(self.status(), self.dir / "status.json")
            self._saved_at = time.time()

    def saved(self, path: Path, step: int) -> None:
        self._step = step
        self.write_status()
        if self._bar is not None:
            self._bar.write(f"saved checkpoint {path}")

    def record_validation(self, val: dict[str, float]) -> None:
        """Keep the latest validation figures (``validation.py``), log them and write status.json."""
        self.val = val
        if self._tb is not None:
            self._tb.add_scalar("val/l1", val["l1"], val["step"])
            self._tb.add_scalar("val/psnr", val["psnr"], val["step"])
        if self._bar is not None:
            self._bar.write(f"step {val['step']}: validation L1 {val['l1']:.4f}, PSNR {val['psnr']:.2f} dB")
        self.write_status()

    def export_notes(self, wall_s: float) -> str:
        """The model card's 'How it was made' for the run's export."""
        t, lo = self.cfg.train, self.cfg.loss
        return (f"Trained with kl-autoencoder, config `{self.cfg.name}` (resolved config: config.yaml in the run directory). "
                f"Steps: {self._step}; images seen: {self.images_seen}; wall time this session: {wall_s / 60:.1f} min; "
                f"batch {t.batch_size} x accumulation {t.grad_accum}; crops {self.cfg.data.crop_size}px; "
                f"loss: {lo.reconstruction} + {lo.perceptual} (weight {lo.perceptual_weight}) "
                f"{f' + mean colour x{lo.colour_weight:g}' if lo.colour_weight else ''} + KL {lo.kl_weight:g}; GAN from step {lo.disc_start}; EMA {t.ema_decay}"
                f"{'' if not t.ema_decay else ' (exported)' if t.export_ema else ' (kept in checkpoints; live weights exported)'}. "
                f"Last losses: {self.last}. Validation: {self.val or 'none'}.")

    def close(self) -> None:
        self.write_status()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
