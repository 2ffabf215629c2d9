"""Is half precision safe for this VAE? Measure it, and record the answer as ``force_upcast``.

fp16 holds magnitudes up to 65504; a VAE decoder whose activations grow past that (the SDXL VAE's do)
turns them into inf, GroupNorm turns inf into NaN, and the pipeline outputs a black image. bf16 has
fp32's range but 8 bits of mantissa, so its risk is error, not overflow. diffusers pipelines run the
VAE in fp32 when ``config.force_upcast`` is true (StableDiffusionXLPipeline: ``needs_upcasting``).

CPU: torch 2.14's CPU fp16 convolution works but is unusably slow (measured on this 2-core machine:
one 3x3 conv, 256 channels, 64x64: fp16 80 s, fp32 0.16 s, bf16 0.12 s). So on CPU fp16 is *emulated*:
fp32 arithmetic with the weights, the input and every module's output rounded to fp16, which is what a
GPU fp16 conv does (fp32 accumulation, fp16 result), and overflows to inf exactly where fp16 would.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from ..convert import update_config
from .. import settings
from ..errors import InputError
from ..model import DTYPES, decode_raw, encoder_moments
from .metrics import psnr
from .samples import synthetic_images

log = logging.getLogger("kl_autoencoder")

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
MIN_PSNR_VS_FP32 = 35.0  # dB: below this a half-precision decode visibly differs from fp32


@dataclasses.dataclass
class PrecisionResult:
    """One half-precision dtype against the fp32 reference (PSNR in dB on uint8 RGB)."""

    dtype: str
    emulated: bool = False  # fp32 math with weights and every module output rounded to ``dtype``
    error: str | None = None  # the exception if this dtype could not run here
    finite: bool = True  # every activation and output finite
    max_activation: float = 0.0  # largest |activation| of any layer in this dtype (inf on overflow)
    overflow_layers: list[str] = dataclasses.field(default_factory=list)  # non-finite outputs, in run order
    latent_rel_error: float = float("nan")  # |mean_half - mean_fp32| / |mean_fp32|, raw latents
    psnr_vs_fp32: float = float("nan")  # decoding fp32 latents in this dtype vs in fp32

    @property
    def safe(self) -> bool:
        return self.error is None and self.finite and self.psnr_vs_fp32 >= MIN_PSNR_VS_FP32


@dataclasses.dataclass
class Fp16Report:
    activations: dict[str, float]  # fp32 max |activation| per module, in run order
    results: dict[str, PrecisionResult]
    images: str

    @property
    def fp16_unsafe(self) -> bool:
        """fp16 overflowed, went non-finite, or drifted; or fp32 activations exceed the fp16 range."""
        r = self.results.get("fp16")
        return (r is not None and not r.safe) or bool(self.over_fp16_range)

    @property
    def over_fp16_range(self) -> list[str]:
        return [k for k, v in self.activations.items() if v > FP16_MAX]

    def format(self, top: int = 5) -> str:
        peak = sorted(self.activations.items(), key=lambda kv: -kv[1])[:top]
        lines = [f"half-precision check on {self.images}", f"  largest fp32 activations (fp16 max {FP16_MAX:.0f}):"]
        lines += [f"    {v:12.4g}  {k}{'  OVER fp16 RANGE' if v > FP16_MAX else ''}" for k, v in peak]
        for name, r in self.results.items():
            if r.error:
                lines.append(f"  {name}: could not run here ({r.error})")
                continue
            first = f"; first non-finite layer {r.overflow_layers[0]} ({len(r.overflow_layers)} in all)" if r.overflow_layers else ""
            lines.append(
                f"  {name}{' (emulated)' if r.emulated else ''}: {'safe' if r.safe else 'UNSAFE'} - max activation {r.max_activation:.4g}, latent error "
                f"{r.latent_rel_error:.2e}, decode PSNR vs fp32 {r.psnr_vs_fp32:.1f} dB{first}"
            )
        lines.append(f"  verdict: {'fp16 UNSAFE: run this VAE in fp32 or bf16 (force_upcast=true)' if self.fp16_unsafe else 'fp16 safe on these images'}")
        return "\n".join(lines)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # DecoderOutput
        return [out.sample]
    return []


class ActivationRecorder:
    """Forward hooks on every submodule: max |output| per module name, in the order modules ran.

    Hooks only queue each output's amax (no device sync per layer); ``remove`` collects them.
    """

    def __init__(self, model: torch.nn.Module):
        self.max: dict[str, float] = {}
        self.nonfinite: list[str] = []  # modules in the order they first output inf/NaN
        self._calls: list[tuple[str, torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules() if name]

    def _hook(self, name: str):
        def hook(_module: torch.nn.Module, _inputs: Any, out: Any) -> None:
            self._calls += [(name, t.detach().abs().amax().float()) for t in _tensors(out) if t.is_floating_point() and t.numel()]

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        peaks = torch.stack([a for _, a in self._calls]).tolist() if self._calls else []
        for (name, _), v in zip(self._calls, peaks):
            v = v if math.isfinite(v) else math.inf  # NaN counts as overflow too
            if v == math.inf and name not in self.nonfinite:
                self.nonfinite.append(name)
            self.max[name] = max(self.max.get(name, 0.0), v)
        self._calls = []


def _round_outputs(model: torch.nn.Module, dtype: torch.dtype) -> list[Any]:
    """Forward hooks that round every module's tensor output to ``dtype`` (kept in fp32 storage)."""

    def hook(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
        return out.to(dtype).float() if isinstance(out, torch.Tensor) and out.is_floating_point() else None

    return [m.register_forward_hook(hook) for name, m in model.named_modules() if name]


@torch.no_grad()
def _run(vae: AutoencoderKL, x: torch.Tensor, z_ref: torch.Tensor | None, emulate: torch.dtype | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, ActivationRecorder]:
    """(posterior mean, decoded image from z_ref or the mean, per-layer record) in the model's dtype,
    or in fp32 rounding to ``emulate`` after every module."""
    dt = next(vae.parameters()).dtype
    rnd = (lambda t: t.to(emulate).float()) if emulate else (lambda t: t.to(dt))
    handles = _round_outputs(vae, emulate) if emulate else []
    rec = ActivationRecorder(vae)  # registered after the rounding hooks, so it sees rounded outputs
    try:
        # eager modules: the fused CPU kernels (inference/fastconv.py) run GroupNorm, SiLU and the upsample
        # inside the next conv, so their outputs would reach no hook and go unmeasured
        with settings.use_fastconv(False):
            moments = encoder_moments(vae, rnd(x))  # (B, 2C, H/8, W/8)
            mean = moments.chunk(2, dim=1)[0].float()
            out = decode_raw(vae, rnd(z_ref if z_ref is not None else mean)).float()  # (B, 3, H, W)
    finally:
        rec.remove()
        for handle in handles:
            handle.remove()
    return mean, out, rec


def check_fp16(
    vae: AutoencoderKL, images: torch.Tensor | None = None, *, dtypes: tuple[str, ...] = ("fp16", "bf16"),
    label: str | None = None, fp16_mode: str = "auto",
) -> Fp16Report:
    """Encode/decode ``images`` ((B, 3, H, W) in [-1, 1]; default synthetic) in fp32 and each half dtype.

    The decoder runs on the fp32 latents in every dtype, so its error is measured alone. ``fp16_mode``:
    "native" runs real fp16 kernels, "emulate" rounds (see module docstring), "auto" emulates on CPU
    only. bf16 always runs natively. A dtype that cannot run is reported, not raised.
    """
    if fp16_mode not in ("auto", "native", "emulate"):
        raise InputError(f"fp16_mode={fp16_mode!r}: choose auto, native or emulate")
    label = label or (f"{len(images)} given images" if images is not None else "4 synthetic images, 128 px")
    x = synthetic_images() if images is None else images
    ref = copy.deepcopy(vae).float().eval()
    x = x.to(next(ref.parameters()).device)
    mean32, out32, rec32 = _run(ref, x, None)
    on_cpu = next(ref.parameters()).device.type == "cpu"
    results = {}
    for name in dtypes:
        dtype = DTYPES[name]
        emulate = dtype == torch.float16 and (fp16_mode == "emulate" or (fp16_mode == "auto" and on_cpu))
        r = PrecisionResult(name, emulated=emulate)
        half = copy.deepcopy(ref).to(dtype)  # weights rounded to the half dtype
        try:
            mean, out, rec = _run(half.float(), x, mean32, emulate=dtype) if emulate else _run(half, x, mean32)
        except (RuntimeError, NotImplementedError) as e:
            r.error, r.finite = str(e).splitlines()[0][:200], False
            results[name] = r
            continue
        r.overflow_layers = rec.nonfinite
        r.max_activation = max(rec.max.values(), default=0.0)
        r.finite = not r.overflow_layers and bool(torch.isfinite(out).all() and torch.isfinite(mean).all())
        r.latent_rel_error = float((mean - mean32).norm() / mean32.norm().clamp_min(1e-12))
        r.psnr_vs_fp32 = psnr(out32, torch.nan_to_num(out, nan=0.0)) if r.finite else -math.inf
        results[name] = r
    return Fp16Report(rec32.max, results, label)


def set_force_upcast(model_dir: str | Path, value: bool) -> Path:
    """Write ``force_upcast`` into a diffusers VAE folder's config.json (atomically); returns its path."""
    return update_config(model_dir, force_upcast=bool(value))
