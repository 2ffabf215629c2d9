"""LPIPS (Zhang et al. 2018, the ``lpips`` package) built offline: the one loader for the loss and the metric.

``lpips.LPIPS(pretrained=True)`` downloads torchvision's ImageNet backbone. Here the backbone is built
untrained (``pnet_rand=True``) and its weights come from a local torchvision file, read with
``torch.load(weights_only=True)`` (never code); the linear calibration heads ship inside the lpips package.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError

# torchvision's ImageNet backbones that lpips wraps (torchvision.models weights URLs name these files)
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def checkpoints_dir() -> Path:
    """Where torch.hub keeps weight files: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def backbone_path(net: str = "vgg", configured: str | Path | None = None, *, fix: str = "") -> Path:
    """The torchvision backbone file for LPIPS-``net``; FileNotFoundError saying where to put it (and ``fix``)."""
    name = LPIPS_BACKBONE_FILES[net]
    if configured:
        p = Path(configured).expanduser()
        if p.is_file():
            return p
        raise FileNotFoundError(f"LPIPS backbone {p} does not exist: it must be torchvision's {name}")
    p = checkpoints_dir() / name
    if p.is_file():
        return p
    raise FileNotFoundError(f"LPIPS-{net} needs torchvision's ImageNet weights {name}: put it in {p.parent}/{fix}")


def _load_backbone(model: nn.Module, path: Path, net: str) -> None:
    """torchvision keys ``features.<i>.<param>`` -> lpips slices ``slice<k>.<i>.<param>`` (the same modules)."""
    from ..convert import read_weights

    state, _ = read_weights(path)  # weights-only: a pickle that needs code is refused
    where = {idx: name for name, sl in model.net.named_children() for idx, _ in sl.named_children()}
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) == 3 and parts[1] in where:
            mapped[f"{where[parts[1]]}.{parts[1]}.{parts[2]}"] = value
    missing = set(model.net.state_dict()) - set(mapped)
    if missing:
        raise InputError(f"{path}: not a torchvision {net} checkpoint (missing {sorted(missing)[:3]}...)")
    model.net.load_state_dict(mapped)


def build_lpips(net: str = "vgg", weights: str | Path | None = None, *, fix: str = "") -> nn.Module:
    """A frozen ``lpips.LPIPS`` that never downloads; gradients flow through it to its inputs.

    ``weights``: the torchvision backbone file, None to look in ``$TORCH_HOME/hub/checkpoints``, or
    ``"random"`` for a randomly initialised backbone (tests only: not a perceptual metric).
    """
    import lpips

    path = None if weights == "random" else backbone_path(net, weights, fix=fix)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        _load_backbone(model, path, net)
    return model.eval().requires_grad_(False)


class LPIPSMetric:
    """LPIPS distance of two uint8 images (H, W, 3); lower is better."""

    def __init__(self, backbone: Path, net: str = "vgg"):
        self.model = build_lpips(net, backbone)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        ta = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
        tb = torch.from_numpy(np.array(b, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1
        return float(self.model(ta, tb).mean())


def make_lpips(path: str | Path | None = None, net: str = "vgg") -> tuple[LPIPSMetric | None, dict[str, Any]]:
    """An LPIPS metric, or None plus an 'unavailable' record naming the file to provide."""
    p = Path(path) if path else checkpoints_dir() / LPIPS_BACKBONE_FILES[net]
    if not p.is_file():
        return None, unavailable(f"LPIPS-{net}", p, f"copy torchvision's {LPIPS_BACKBONE_FILES[net]} there (or pass --lpips-weights FILE)")
    return LPIPSMetric(p, net), {"available": True, "net": net, "file": str(p)}


def unavailable(name: str, path: Path, how: str) -> dict[str, Any]:
    """The record a report keeps for a metric whose weights file is missing."""
    return {"available": False, "reason": f"{name}: weights file {path} not found; {how}", "file": str(path)}
