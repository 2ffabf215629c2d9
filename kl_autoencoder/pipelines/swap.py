"""Swapping the VAE of a diffusers pipeline, after checking that the latent spaces agree.

A diffusion model is trained on one VAE's normalised latents (``(z - shift) * scale``, or the VAE's
per-channel / FLUX.2 BatchNorm rule: ``model/normalization.py``). A new VAE only
works in its place if its decoder reads those latents: a decoder fine-tuned on a frozen encoder
(sd-vae-ft-mse) does; an unrelated VAE (another seed, SDXL's VAE under SD 1.5) decodes garbage. So
before writing we measure, on sample images, the current encoder -> new decoder reconstruction (what
the pipeline will produce) next to each VAE's own, and the distance between the two latent codes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL
from torch import nn

from ..convert import load
from ..errors import InputError
from ..evaluation.metrics import psnr
from ..evaluation.samples import load_sample_images, synthetic_images
from ..inference import decode, encode
from ..model import is_vae, latent_normalization, normalized_channels, size_multiple
from ..utils.files import staging_dir

log = logging.getLogger("kl_autoencoder")

MAX_LATENT_REL_ERROR = 0.3  # ||new - current|| / ||current|| on normalised latents: a latent-space SNR of ~10 dB
MAX_PSNR_DROP_DB = 3.0  # current encoder -> new decoder may be at most this far below the new VAE's own
LINK_MIN_BYTES = 1 << 20  # files this large are hard-linked (weights); smaller ones (configs) are copied


class IncompatibleVAEError(InputError):
    """The new VAE's latent space does not match the pipeline's; ``report`` says how."""

    def __init__(self, report: "SwapReport"):
        super().__init__("; ".join(report.problems) + " (pass force=True / --force to swap anyway)")
        self.report = report


# ----------------------------------------------------------------------------- compatibility


@dataclasses.dataclass
class SwapReport:
    """How well a new VAE fits a pipeline trained on the current VAE's latents (PSNR in dB, uint8 RGB)."""

    current: dict[str, Any]
    new: dict[str, Any]
    images: str
    psnr_current: float = float("nan")  # current VAE's own reconstructions
    psnr_new: float = float("nan")  # new VAE's own reconstructions
    psnr_cross: float = float("nan")  # current encoder -> new decoder: what the pipeline will output
    latent_rel_error: float = float("nan")  # ||new - current|| / ||current||, normalised latents
    problems: list[str] = dataclasses.field(default_factory=list)
    out_dir: Path | None = None
    pipeline: Any = None

    @property
    def compatible(self) -> bool:
        return not self.problems

    def format(self) -> str:
        rows = [("latent channels", "latent_channels"), ("downsample factor", "downsample"), ("scaling_factor", "scaling_factor"),
                ("shift_factor", "shift_factor"), ("normalisation", "normalization"), ("latent std (normalised)", "latent_std")]
        lines = ["VAE swap compatibility report", f"  {'':26s}{'current VAE':>14s}{'new VAE':>14s}"]
        for label, key in rows:
            a, b = self.current.get(key), self.new.get(key)
            fmt = (lambda v: f"{v:.4g}") if isinstance(a, float) or isinstance(b, float) else str
            lines.append(f"  {label:26s}{fmt(a) if a is not None else '-':>14s}{fmt(b) if b is not None else '-':>14s}")
        if self.current.get("unet_in_channels") is not None:
            lines.append(f"  {'pipeline UNet in_channels':26s}{self.current['unet_in_channels']:>14d}")
        if not math.isnan(self.psnr_cross):
            lines += [
                f"  measured on {self.images}:",
                f"    current VAE, own reconstruction      PSNR {self.psnr_current:6.2f} dB",
                f"    new VAE, own reconstruction          PSNR {self.psnr_new:6.2f} dB",
                f"    current encoder -> new decoder       PSNR {self.psnr_cross:6.2f} dB  (what the pipeline will output)",
                f"    latent difference |new - current| / |current| = {self.latent_rel_error:.3f} (limit {MAX_LATENT_REL_ERROR})",
            ]
        verdict = "compatible" if self.compatible else "INCOMPATIBLE: " + "; ".join(self.problems)
        return "\n".join(lines + [f"  verdict: {verdict}"])


def _describe(vae: nn.Module) -> dict[str, Any]:
    norm = latent_normalization(vae)
    return {"latent_channels": normalized_channels(vae), "downsample": size_multiple(vae),
            "scaling_factor": norm.scaling_factor if norm.kind != "batchnorm" else None, "shift_factor": norm.shift_factor,
            "normalization": norm.kind}


@torch.no_grad()
def compare_vaes(current: AutoencoderKL, new: AutoencoderKL, images: torch.Tensor | None = None, *,
                 unet_in_channels: int | None = None, images_label: str | None = None) -> SwapReport:
    """Measure whether ``new`` can decode latents made by ``current`` (images in [-1, 1], (B, 3, H, W))."""
    report = SwapReport(_describe(current), _describe(new), images_label or "")
    report.current["unet_in_channels"] = unet_in_channels
    if images is None:
        images = synthetic_images()
        report.images = f"{len(images)} synthetic images, {images.shape[-1]} px"
    (c_cur, f_cur), (c_new, f_new) = ((r["latent_channels"], r["downsample"]) for r in (report.current, report.new))
    if c_cur != c_new:
        report.problems.append(f"latent channels differ ({c_cur} vs {c_new}); no diffusion model can use both")
        return report
    if f_cur != f_new:
        report.problems.append(f"latent channels at different sizes (1/{f_cur} vs 1/{f_new}); no diffusion model can use both")
        return report
    if unet_in_channels is not None and unet_in_channels != report.new["latent_channels"]:
        report.problems.append(f"the UNet takes {unet_in_channels} channels, the new VAE makes {report.new['latent_channels']}")
    kw = {"tiling": "never"}
    z_cur = encode(current, images, **kw).cpu()  # (B, C, H/8, W/8) normalised (each VAE's own rule): what the UNet was trained on
    z_new = encode(new, images, **kw).cpu()  # the two VAEs may sit on different devices
    report.current["latent_std"], report.new["latent_std"] = float(z_cur.std()), float(z_new.std())
    report.psnr_current = psnr(images, decode(current, z_cur, **kw).clamp(-1, 1))
    report.psnr_new = psnr(images, decode(new, z_new, **kw).clamp(-1, 1))
    report.psnr_cross = psnr(images, decode(new, z_cur, **kw).clamp(-1, 1))
    report.latent_rel_error = float((z_new - z_cur).norm() / z_cur.norm().clamp_min(1e-12))
    if report.latent_rel_error > MAX_LATENT_REL_ERROR:
        report.problems.append(f"latent spaces differ (relative difference {report.latent_rel_error:.2f} > {MAX_LATENT_REL_ERROR})")
    if report.psnr_cross < report.psnr_new - MAX_PSNR_DROP_DB:
        report.problems.append(f"the new decoder reads the current latents {report.psnr_new - report.psnr_cross:.1f} dB "
                               f"worse than its own (limit {MAX_PSNR_DROP_DB} dB)")
    return report


# ----------------------------------------------------------------------------- writing


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link and src.stat().st_size >= LINK_MIN_BYTES:
        try:
            os.link(src.resolve(), dst)  # hard link: no extra disk, survives moving either folder
            return
        except OSError:
            pass  # another file system, or links unsupported: copy instead
    shutil.copy2(src, dst)


def _unet_in_channels(pipe_dir: Path) -> int | None:
    cfg = pipe_dir / "unet" / "config.json"
    try:
        return int(json.loads(cfg.read_text())["in_channels"]) if cfg.is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def _write_vae(vae: AutoencoderKL, folder: Path, fp16_variant: bool) -> None:
    vae.save_pretrained(folder, safe_serialization=True)
    if fp16_variant:  # the source pipeline ships *.fp16.* files; loading it with variant="fp16" must still work
        import copy

        copy.deepcopy(vae).half().save_pretrained(folder, safe_serialization=True, variant="fp16")


def _check_images(images: torch.Tensor | Sequence[str | Path] | None, size: int) -> tuple[torch.Tensor, str]:
    if images is None:
        return synthetic_images(size=size), f"4 synthetic images, {size} px"
    if not isinstance(images, torch.Tensor):
        images = load_sample_images(images, size)
        return images, f"{len(images)} image(s), centre-cropped to {size} px"
    return images, f"{len(images)} given images"


def _fp32(vae: AutoencoderKL) -> AutoencoderKL:
    """An fp32 version for measuring, leaving the caller's model as it is."""
    import copy

    return vae if next(vae.parameters()).dtype == torch.float32 else copy.deepcopy(vae).float()


def _copy_pipeline(src: Path, vae: AutoencoderKL, out: Path, link: bool) -> None:
    """``out``: every file of the pipeline folder ``src`` but ``vae/`` (large ones hard-linked), and the new ``vae/``."""
    with staging_dir(out, "swap") as tmp:
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src)
            if rel.parts[0] == "vae" or not f.is_file():
                continue
            _link_or_copy(f, tmp / rel, link)
        _write_vae(vae, tmp / "vae", fp16_variant=any(".fp16." in f.name for f in (src / "vae").iterdir()))


def _pipeline_parts(pipe_or_dir: Any) -> tuple[AutoencoderKL, int | None]:
    """(the current VAE, the UNet's input channels or None) of a pipeline folder or object."""
    if isinstance(pipe_or_dir, (str, Path)):
        src = Path(pipe_or_dir)
        if not (src / "model_index.json").is_file() or not (src / "vae" / "config.json").is_file():
            raise FileNotFoundError(f"{src}: not a diffusers pipeline folder (needs model_index.json and vae/config.json)")
        return load(src / "vae"), _unet_in_channels(src)
    unet = getattr(pipe_or_dir, "unet", None)
    return pipe_or_dir.vae, getattr(getattr(unet, "config", None), "in_channels", None)


def swap_vae(
    pipe_or_dir: Any,
    vae: AutoencoderKL | str | Path,
    out_dir: str | Path | None = None,
    *,
    force: bool = False,
    images: torch.Tensor | Sequence[str | Path] | None = None,
    size: int = 128,
    link: bool = True,
    show: Callable[[SwapReport], None] | None = None,
) -> SwapReport:
    """Replace a pipeline's VAE with ``vae`` after checking latent compatibility; returns the report.

    ``pipe_or_dir``: a pipeline folder (``out_dir`` required: a new folder with ``vae/`` replaced, the
    other files hard-linked (large) or copied, ``model_index.json`` byte-identical), or a diffusers
    pipeline object (``report.pipeline`` is a new pipeline sharing its other components; saved to
    ``out_dir`` if given). ``images``: a (B, 3, H, W) tensor in [-1, 1] or image paths; default:
    synthetic images of ``size`` px. ``show`` gets the report before anything is written.
    Raises IncompatibleVAEError unless compatible or ``force`` (never for differing latent channels).
    """
    if not is_vae(vae):
        vae = load(vae)
    images, label = _check_images(images, size)
    is_dir = isinstance(pipe_or_dir, (str, Path))
    if is_dir and out_dir is None:
        raise InputError("swap_vae: give out_dir when the pipeline is a folder")
    current, unet_in = _pipeline_parts(pipe_or_dir)
    if out_dir is not None and Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new output folder")
    report = compare_vaes(_fp32(current), _fp32(vae), images, unet_in_channels=unet_in, images_label=label)
    if show is not None:
        show(report)
    hard = any("channels" in m for m in report.problems)
    if report.problems and (not force or hard):
        raise IncompatibleVAEError(report)
    if report.problems:
        log.warning("swapping anyway (force): %s", "; ".join(report.problems))
    if is_dir:
        _copy_pipeline(Path(pipe_or_dir), vae, Path(out_dir), link)
    else:
        p = next(current.parameters())
        report.pipeline = type(pipe_or_dir)(**{**pipe_or_dir.components, "vae": vae.to(p.device, p.dtype)})
        if out_dir is not None:
            with staging_dir(out_dir, "swap") as tmp:
                report.pipeline.save_pretrained(tmp, safe_serialization=True)
    report.out_dir = Path(out_dir) if out_dir is not None else None
    return report
