"""Memory planning: how much a pass needs, and so how it runs (untiled, by image, tiled, approximately).

The estimates are rough on purpose: a few full-size maps of the widest full-resolution layer, with
factors measured by tools/bench_tiling.py and tools/bench.py. ``tiling_plan`` picks the mode for
``tiling="auto"``; ``reuse_fits`` decides whether malloc.py's reuse (faster, higher peak) may run.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import InputError
from ..model import downsample_factor
from . import malloc

# `auto` tiles when an untiled pass would need more than this share of the device's free memory. On a CPU
# the rest of the machine shares RAM; a GPU's free memory is the process's own to use, less the caching
# allocator's fragmentation and cuDNN workspaces.
AUTO_MEMORY_FRACTION = 0.5
CUDA_MEMORY_FRACTION = 0.8
# Untiled peak RSS growth / bytes of the largest activation, measured with tools/bench_tiling.py
# (tiny-kl-f8 at 1024 px, diffusers 0.42, torch 2.14 CPU): 4.2 for encode, 7.7 for decode.
UNTILED_PEAK_FACTOR = 8.0
# Exact tiling's peak / bytes of the largest activation of one image (a few full-size maps of the widest
# full-resolution layer): 3.7 for tiny-kl-f8, 4.2 for sd-kl-f8, decoding 2048 px (tools/bench_tiling.py).
TILED_PEAK_FACTOR = 4.5


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for new allocations on ``device``: on a GPU ``torch.cuda.mem_get_info`` plus what torch's
    caching allocator holds but does not use (mem_get_info counts it as taken: without it the second large
    call would plan from a budget the first one's freed blocks still fill; the model's own weights are
    resident and not counted), else the host's available RAM (psutil if installed, else sysconf) plus the
    freed memory malloc.py keeps for this process's next call (mapped, so not in the host's count)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        host = int(psutil.virtual_memory().available)
    except ImportError:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return host + malloc.kept_bytes()


def memory_budget(vae: nn.Module) -> int:
    """Bytes a pass of ``vae`` may plan for: a share of the free memory of the device its weights are on."""
    device = next(vae.parameters()).device
    fraction = CUDA_MEMORY_FRACTION if device.type == "cuda" else AUTO_MEMORY_FRACTION
    return int(fraction * available_memory(device))


def _largest_activation_bytes(vae: nn.Module, shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    """(bytes of the largest activation of the batch, bytes of the weights)."""
    chans = list(vae.config.block_out_channels)
    f = downsample_factor(vae)
    b, hw = shape[0], shape[-2] * shape[-1] * (f * f if kind == "decode" else 1)
    p = next(vae.parameters())
    largest = max(c * hw // (4**i) for i, c in enumerate(chans))
    weights = sum(q.numel() for q in vae.parameters()) * p.element_size()
    return largest * b * p.element_size(), weights


def estimate_tiled_bytes(vae: nn.Module, shape: tuple[int, ...], kind: str) -> int:
    """Rough peak memory of exact tiling (one image at a time): ``TILED_PEAK_FACTOR`` full-size maps of the
    widest full-resolution layer plus the weights. It grows with the image; ``tiling_approx`` does not."""
    largest, weights = _largest_activation_bytes(vae, (1, *shape[1:]), kind)
    return int(TILED_PEAK_FACTOR * largest) + weights


def estimate_untiled_bytes(vae: nn.Module, shape: tuple[int, ...], kind: str) -> int:
    """Rough peak memory of an untiled pass over a batch ``shape`` (images for "encode", latents for "decode").

    The estimate is ``UNTILED_PEAK_FACTOR`` times the largest activation (channels x pixels x batch x
    bytes, over resolution levels), plus the weights: the untiled peak is a handful of full-size
    temporaries of the widest full-resolution layer (input, GroupNorm output, activation, conv output).
    """
    largest, weights = _largest_activation_bytes(vae, shape, kind)
    return int(UNTILED_PEAK_FACTOR * largest) + weights


def tiling_plan(vae: nn.Module, shape: tuple[int, ...], kind: str, tiling: str = "auto", budget: int | None = None) -> str:
    """How to run a pass: "whole" (one untiled batch), "slices" (untiled, an image at a time), "tiles"
    (exact tiling) or "approx" (approximate low-memory tiling, ``tiling_approx.py``).

    ``auto``: whole if the untiled estimate fits in ``budget`` bytes (default: ``memory_budget``, a share of
    the free memory of the model's device), else slices if one image fits, else exact tiles if their estimate fits, else approx
    (the caller warns: it is not exact).
    """
    explicit = {"never": "whole", "always": "tiles", "approx": "approx"}
    if tiling in explicit:
        return explicit[tiling]
    if tiling != "auto":
        raise InputError(f"tiling={tiling!r}: choose one of auto, {', '.join(explicit)}")
    budget = memory_budget(vae) if budget is None else budget
    need = estimate_untiled_bytes(vae, shape, kind)
    if need <= budget:
        return "whole"
    if shape[0] > 1 and estimate_untiled_bytes(vae, (1, *shape[1:]), kind) <= budget:
        return "slices"
    return "tiles" if estimate_tiled_bytes(vae, shape, kind) <= budget else "approx"


# malloc.py's reuse keeps freed blocks in the heap instead of page-faulting fresh ones at every call
# (SD 512 px, tools/bench.py run E: plain diffusers alone 1.27x encode, 1.32x decode), but the heap
# fragments and the peak rises: SD 512 px, MiB above the loaded model, default -> reuse: plain encode
# 640 -> 1954, decode 929 -> 2134; ours 1178-1485 / 1331-1907 (runs E-G); estimate_untiled_bytes says 1343. So only
# where twice the estimate fits, and never in the tiled modes, which exist to bound memory.
REUSE_MEMORY_FACTOR = 2.0


def reuse_fits(vae: nn.Module, shape: tuple[int, ...], kind: str, plan: str) -> bool:
    """Whether a pass planned as ``plan`` may run inside ``malloc.reuse_freed_memory()``: untiled, on CPU,
    and twice the untiled estimate fits in the auto budget."""
    if plan not in ("whole", "slices") or next(vae.parameters()).device.type != "cpu":
        return False
    one = shape if plan == "whole" else (1, *shape[1:])
    return REUSE_MEMORY_FACTOR * estimate_untiled_bytes(vae, one, kind) <= memory_budget(vae)
