"""The public Python API: create, load, encode, decode, reconstruct, export.

Latent convention (diffusers/SD3): a VAE's raw latent ``z`` is normalised as
``latents = (z - shift_factor) * scaling_factor`` so a diffusion model sees unit-variance latents;
``decode`` inverts it. ``shift_factor`` is 0 when the config has none (SD 1.x/2.x).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .config import Config, ModelConfig, load_config
from .images import as_image_batch
from .malloc import reuse_freed_memory
from .memory_plan import reuse_fits, tiling_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def create(preset: str | Path | Config | ModelConfig = "sd-kl-f8", *, seed: int | None = None) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL from a preset name, YAML path or config; seeded, so repeatable."""
    if isinstance(preset, Config):
        mcfg = preset.model
    elif isinstance(preset, ModelConfig):
        mcfg = preset
    else:
        mcfg = load_config(preset).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mcfg.seed if seed is None else seed)
        vae = AutoencoderKL(**mcfg.diffusers_kwargs())
    return vae.eval()


def load(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load a VAE from a local path; nothing is fetched from a network.

    ``path``: a diffusers folder (config.json + weights), a pipeline folder (its ``vae/``), or a single
    weights file (.safetensors, .ckpt, .pt, .bin) in diffusers or LDM layout (see ``convert``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or file")
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a diffusers VAE folder (no config.json); export one with `kl-autoencoder export`")
        torch_dtype = (DTYPES[dtype] if isinstance(dtype, str) else dtype) if dtype is not None else None
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype)
    else:
        from .convert import load_file

        vae = load_file(path)
    vae = vae.to(device)
    if dtype is not None:
        vae = vae.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
    return vae.eval()


def downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae: AutoencoderKL) -> float:
    s = getattr(vae.config, "shift_factor", None)
    return 0.0 if s is None else float(s)


def normalize_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Raw latents -> normalised ``(z - shift) * scale``."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def denormalize_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> raw ``latents / scale + shift``."""
    return latents / vae.config.scaling_factor + _shift(vae)


def _param(vae: AutoencoderKL) -> torch.Tensor:
    return next(vae.parameters())


def _prepare(vae: AutoencoderKL, images: Any, pad: str | None) -> tuple[torch.Tensor, tuple[int, int]]:
    x = as_image_batch(images)  # (B, 3, H, W) in [-1, 1]
    if x.shape[1] != vae.config.in_channels:
        raise ValueError(f"images have {x.shape[1]} channels, the VAE expects {vae.config.in_channels}")
    h, w = x.shape[-2:]
    f = downsample_factor(vae)
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        if pad is None:
            raise ValueError(f"image size {w}x{h} is not a multiple of {f}; crop it, or pass pad='reflect'")
        mode = "reflect" if pad == "reflect" and ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)  # (B, 3, H', W'), multiples of f; reconstruct() crops back
    p = _param(vae)
    return x.to(device=p.device, dtype=p.dtype), (h, w)


def _generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator:
    if generator is None:
        raise ValueError("sample=True needs generator=torch.Generator or an integer seed, so results are reproducible")
    if isinstance(generator, int):
        return torch.Generator(device=device).manual_seed(generator)
    return generator


TILING_MODES = ("auto", "always", "never", "approx")


@torch.no_grad()
def encode_moments(
    vae: AutoencoderKL,
    images: Any,
    *,
    pad: str | None = "reflect",
    tiling: str = "auto",
    tile_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance, both raw (unnormalised), (B, C, ceil(H/8), ceil(W/8)), float32.

    ``tiling``: "never" runs the plain encoder; "always" / "auto" (large images) run the exact tiled
    encoder of ``tiling.py`` with ``tile_size`` image pixels per tile; "approx" the approximate
    low-memory one of ``tiling_approx.py`` (memory independent of the image size, not exact).
    """
    if tiling not in TILING_MODES:
        raise ValueError(f"tiling={tiling!r}: choose one of {', '.join(TILING_MODES)}")
    x, _ = _prepare(vae, images, pad)
    from .tiling import tiled_encode_moments

    plan = tiling_plan(vae, tuple(x.shape), "encode", tiling)
    if plan == "approx":
        from .tiling_approx import approx_encode_moments

        _warn_approx(tiling, x.shape)
        return approx_encode_moments(vae, x, tile_size)
    if plan == "tiles":
        return tiled_encode_moments(vae, x, tile_size)
    enc = lambda t: vae.quant_conv(vae.encoder(t)) if vae.quant_conv is not None else vae.encoder(t)  # noqa: E731
    with reuse_freed_memory(enabled=reuse_fits(vae, tuple(x.shape), "encode", plan)):  # malloc.py
        moments = torch.cat([enc(t) for t in x.split(1)]) if plan == "slices" else enc(x)  # (B, 2C, h, w)
    mean, logvar = moments.float().chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps alike


def encode(
    vae: AutoencoderKL,
    images: Any,
    *,
    sample: bool = False,
    generator: torch.Generator | int | None = None,
    pad: str | None = "reflect",
    tiling: str = "auto",
    tile_size: int | None = None,
) -> torch.Tensor:
    """Images -> normalised latents ``(z - shift) * scale``, (B, C, ceil(H/8), ceil(W/8)), float32.

    ``images``: float tensor in [-1, 1] (B,3,H,W) or (3,H,W), uint8 arrays/tensors (…,H,W,3), PIL images.
    ``z`` is the posterior mean unless ``sample=True``, which draws from the posterior with ``generator``
    (a torch.Generator or an int seed; required). Sizes that are not multiples of 8 are padded on the
    bottom/right (``pad="reflect"``; ``pad=None`` raises instead); ``reconstruct`` crops back.
    """
    mean, logvar = encode_moments(vae, images, pad=pad, tiling=tiling, tile_size=tile_size)
    z = mean
    if sample:
        g = _generator(generator, mean.device)
        std = torch.exp(0.5 * logvar)
        z = mean + std * torch.randn(mean.shape, generator=g, device=mean.device, dtype=mean.dtype)
    return normalize_latents(vae, z)


def check_latents(vae: AutoencoderKL, latents: Any, name: str = "latents") -> torch.Tensor:
    """Validate a latent tensor: float, (B, C, h, w) or (C, h, w), C = latent channels, all finite."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got {latents.dtype}")
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, h, w), got {tuple(latents.shape)}")
    c = vae.config.latent_channels
    if latents.shape[1] != c:
        raise ValueError(f"{name}: has {latents.shape[1]} channels, this VAE's latents have {c}")
    if not torch.isfinite(latents).all():
        n = int((~torch.isfinite(latents)).sum())
        raise ValueError(f"{name}: {n} non-finite values (NaN/inf)")
    return latents


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, *, tiling: str = "auto", tile_size: int | None = None) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w), float32, nominally in [-1, 1].

    The output is not clamped, so it equals diffusers' ``vae.decode(latents / scale + shift)``;
    ``to_pil``/``to_uint8`` clamp. A half-precision VAE whose output is not finite (fp16 overflow,
    the SDXL-VAE black image) is re-run in fp32 with a warning.
    """
    if tiling not in TILING_MODES:
        raise ValueError(f"tiling={tiling!r}: choose one of {', '.join(TILING_MODES)}")
    latents = check_latents(vae, latents)
    p = _param(vae)
    z = denormalize_latents(vae, latents.to(device=p.device, dtype=torch.float32))  # (B, C, h, w) raw
    from .tiling import tiled_decode

    plan = tiling_plan(vae, tuple(z.shape), "decode", tiling)
    if plan == "approx":
        from .tiling_approx import approx_decode

        _warn_approx(tiling, z.shape)
        run = lambda m, t: approx_decode(m, t, tile_size)  # noqa: E731
    elif plan == "tiles":
        run = lambda m, t: tiled_decode(m, t, tile_size)  # noqa: E731
    elif plan == "slices":
        run = lambda m, t: torch.cat([_decode_raw(m, s) for s in t.split(1)])  # noqa: E731
    else:
        run = _decode_raw
    with reuse_freed_memory(enabled=reuse_fits(vae, tuple(z.shape), "decode", plan)):  # malloc.py; off when tiled
        out = run(vae, z.to(p.dtype))
        if p.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
            import copy
            import warnings

            warnings.warn(f"{p.dtype} decode overflowed (non-finite output); decoding again in fp32", stacklevel=2)
            out = run(copy.deepcopy(vae).float(), z)
    return out.float()


def _warn_approx(tiling: str, shape: torch.Size) -> None:
    if tiling == "auto":  # asked for approx explicitly: no warning
        import warnings

        warnings.warn(f"{tuple(shape)}: even exact tiling would not fit in memory; using tiling='approx' "
                      "(approximate GroupNorm statistics, see docs/benchmarks.md)", stacklevel=3)


def _decode_raw(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return vae.decoder(z)  # (B, 3, 8h, 8w)


def reconstruct(
    vae: AutoencoderKL,
    images: Any,
    *,
    sample: bool = False,
    generator: torch.Generator | int | None = None,
    tiling: str = "auto",
    tile_size: int | None = None,
) -> torch.Tensor:
    """Encode then decode; output cropped back to the input size, float32 in [-1, 1] (clamped)."""
    x = as_image_batch(images)
    h, w = x.shape[-2:]
    z = encode(vae, x, sample=sample, generator=generator, tiling=tiling, tile_size=tile_size)
    out = decode(vae, z, tiling=tiling, tile_size=tile_size)
    return out[..., :h, :w].clamp(-1, 1)


def num_parameters(vae: torch.nn.Module) -> int:
    return sum(p.numel() for p in vae.parameters())


def _card(vae: AutoencoderKL, dtype: str, notes: str | None, name: str) -> str:
    c = vae.config
    shift = _shift(vae)
    f = downsample_factor(vae)
    lines = [
        f"# {name}",
        "",
        "A KL autoencoder (diffusers `AutoencoderKL`) exported by kl-autoencoder.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {num_parameters(vae):,} |",
        f"| block_out_channels | {list(c.block_out_channels)} |",
        f"| layers_per_block | {c.layers_per_block} |",
        f"| latent | {c.latent_channels} channels at 1/{f} of the image size |",
        f"| quant convs | {getattr(c, 'use_quant_conv', True)} / {getattr(c, 'use_post_quant_conv', True)} |",
        f"| scaling_factor | {c.scaling_factor} |",
        f"| shift_factor | {getattr(c, 'shift_factor', None)} |",
        f"| weights dtype | {dtype} |",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import AutoencoderKL",
        'vae = AutoencoderKL.from_pretrained("PATH/TO/THIS/FOLDER")',
        "z = vae.encode(images).latent_dist.mean          # images in [-1, 1], (B, 3, H, W)",
        f"latents = (z - {shift}) * {c.scaling_factor}   # what a diffusion model sees",
        f"images = vae.decode(latents / {c.scaling_factor} + {shift}).sample",
        "```",
    ]
    if notes:
        lines += ["", "## How it was made", "", notes.strip()]
    return "\n".join(lines) + "\n"


def export(
    vae: AutoencoderKL,
    out: str | Path,
    *,
    format: str = "diffusers",
    dtype: str = "fp32",
    notes: str | None = None,
    name: str | None = None,
) -> Path:
    """Write ``vae`` for other tools; the model itself is not changed.

    ``format="diffusers"``: a folder with config.json, diffusion_pytorch_model.safetensors and a
    README.md model card, loadable by ``AutoencoderKL.from_pretrained``. ``format="ldm"``: one
    .safetensors file in CompVis/LDM key layout (ComfyUI, AUTOMATIC1111). ``dtype``: fp32, fp16, bf16.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if format == "ldm":
        from .convert import save_ldm

        return save_ldm(vae, out, dtype=dtype)
    if format != "diffusers":
        raise ValueError(f"format {format!r}: choose diffusers or ldm")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    import copy

    half = copy.deepcopy(vae)
    for t in list(half.parameters()) + list(half.buffers()):  # cast tensors, not the module: no diffusers upcast warning
        if t.is_floating_point():
            t.data = t.data.to(DTYPES[dtype])
    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    half.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").write_text(_card(vae, dtype, notes, name or out.name))
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # replace file by file: an interrupted export never leaves a half-written file
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out


def model_summary(vae: AutoencoderKL) -> dict[str, Any]:
    c = vae.config
    return {
        "parameters": num_parameters(vae),
        "block_out_channels": list(c.block_out_channels),
        "layers_per_block": c.layers_per_block,
        "latent_channels": c.latent_channels,
        "downsample_factor": downsample_factor(vae),
        "scaling_factor": c.scaling_factor,
        "shift_factor": getattr(c, "shift_factor", None),
        "dtype": str(_param(vae).dtype).replace("torch.", ""),
    }


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1], computed on uint8-quantised pixels (peak 255)."""
    qa = ((a.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    mse = float(((qa - qb) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
