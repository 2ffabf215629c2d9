"""Image-quality metrics for reconstructions: PSNR, SSIM, LPIPS, rFID, baselines and compression figures.

All pixel metrics work on uint8 RGB images (H, W, 3), i.e. on what a user saves to disk, so two
tools that quantise alike agree. PSNR and SSIM come from torchmetrics (SSIM: 11x11 Gaussian window,
sigma 1.5, K1=0.01, K2=0.03, data range 255 -- Wang et al. 2004, as scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``).
LPIPS and rFID need pretrained weights that are never downloaded here: when the file is missing
the metric is reported as unavailable together with the file to provide.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# torchvision / torch-fidelity file names (the weights their loaders would otherwise download)
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3


def checkpoints_dir() -> Path:
    """Where torch.hub keeps weight files: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _chw(a: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None].to(dtype)  # (1, 3, H, W) in [0, 255]


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 RGB images (H, W, 3), peak 255; inf when identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(_chw(a), _chw(b), data_range=255.0))


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Gaussian window 11, sigma 1.5, data range 255, mean over RGB) of two uint8 images (H, W, 3)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    # float32: 10x faster than float64 (oneDNN convs); agrees with float64 to ~1e-5 on 0..255 images
    _, full = structural_similarity_index_measure(
        _chw(a, torch.float32), _chw(b, torch.float32), data_range=255.0, return_full_image=True
    )  # (1, 3, H, W) SSIM map over reflect-padded input
    # Wang et al.'s reference code (and scikit-image) average only where the 11x11 window fits
    # inside the image; torchmetrics averages the padded border too. Crop the 5-pixel border.
    r = (11 - 1) // 2
    return float(full[..., r:-r, r:-r].double().mean()) if min(a.shape[:2]) > 2 * r else float(full.double().mean())


def bicubic_baseline(img: Image.Image, factor: int) -> Image.Image:
    """PIL bicubic downsample by ``factor`` then bicubic upsample back (size must divide by ``factor``)."""
    w, h = img.size
    small = img.resize((w // factor, h // factor), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)


def encoded_size(img: Image.Image, fmt: str, **kwargs: Any) -> tuple[int, Image.Image]:
    """Bytes of ``img`` saved as ``fmt`` (PNG, JPEG) in memory, and the decoded image."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    n = buf.tell()
    buf.seek(0)
    return n, Image.open(buf).convert("RGB")


def latent_bits_per_pixel(latent_shape: tuple[int, ...], image_hw: tuple[int, int], bits: int = 16) -> float:
    """Bits per image pixel of a (C, h, w) latent stored at ``bits`` bits per value."""
    return math.prod(latent_shape[-3:]) * bits / (image_hw[0] * image_hw[1])


def unavailable(name: str, path: Path, how: str) -> dict[str, Any]:
    return {"available": False, "reason": f"{name}: weights file {path} not found; {how}", "file": str(path)}


# ----------------------------------------------------------------------------- LPIPS


class LPIPSMetric:
    """LPIPS (Zhang et al. 2018, ``lpips`` package) with the backbone loaded from a local file only.

    ``lpips.LPIPS(pretrained=True)`` fetches torchvision's ImageNet backbone from the network; here the
    backbone is built untrained (``pnet_rand=True``) and its weights come from ``backbone_path``
    (torch.load(weights_only=True)). The linear heads ship inside the lpips package.
    """

    def __init__(self, backbone_path: Path, net: str = "vgg"):
        import lpips

        self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
        state = torch.load(backbone_path, map_location="cpu", weights_only=True)
        # torchvision keys "features.<i>.<param>" -> lpips slices "slice<k>.<i>.<param>" (same modules)
        where = {idx: name for name, sl in self.model.net.named_children() for idx, _ in sl.named_children()}
        mapped = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and parts[1] in where:
                mapped[f"{where[parts[1]]}.{parts[1]}.{parts[2]}"] = value
        missing = set(self.model.net.state_dict()) - set(mapped)
        if missing:
            raise ValueError(f"{backbone_path}: not a torchvision {net} checkpoint (missing {sorted(missing)[:3]}...)")
        self.model.net.load_state_dict(mapped)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS distance of two uint8 images (H, W, 3); lower is better."""
        ta = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
        tb = torch.from_numpy(np.array(b, copy=True)).permute(2, 0, 1)[None].float() / 127.5 - 1
        return float(self.model(ta, tb).mean())


def make_lpips(path: str | Path | None = None, net: str = "vgg") -> tuple[LPIPSMetric | None, dict[str, Any]]:
    """An LPIPS metric, or None plus an 'unavailable' record naming the file to provide."""
    p = Path(path) if path else checkpoints_dir() / LPIPS_BACKBONE_FILES[net]
    if not p.is_file():
        return None, unavailable(
            f"LPIPS-{net}", p, f"copy torchvision's {LPIPS_BACKBONE_FILES[net]} there (or pass --lpips-weights FILE)"
        )
    return LPIPSMetric(p, net), {"available": True, "net": net, "file": str(p)}


# ----------------------------------------------------------------------------- rFID


class FIDMetric:
    """rFID: Frechet Inception distance between originals and reconstructions (torchmetrics + torch-fidelity).

    torch-fidelity loads its Inception weights with an unsafe ``torch.load``; we hand it the state
    dict read with ``weights_only=True`` from the local file instead.
    """

    def __init__(self, weights_path: Path):
        import torch_fidelity.feature_extractor_inceptionv3 as tfi
        from torchmetrics.image.fid import FrechetInceptionDistance

        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        original = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: state  # no download: the file read above
        try:
            self.fid = FrechetInceptionDistance(feature=2048, normalize=False)
        finally:
            tfi.load_state_dict_from_url = original
        self.n = 0

    def update(self, original: np.ndarray, reconstruction: np.ndarray) -> None:
        """Add one uint8 (H, W, 3) pair."""
        self.fid.update(torch.from_numpy(np.array(original, copy=True)).permute(2, 0, 1)[None], real=True)
        self.fid.update(torch.from_numpy(np.array(reconstruction, copy=True)).permute(2, 0, 1)[None], real=False)
        self.n += 1

    def compute(self) -> float | None:
        """rFID, or None with fewer than 2 images (the covariance needs two)."""
        return float(self.fid.compute()) if self.n >= 2 else None


def make_fid(path: str | Path | None = None) -> tuple[FIDMetric | None, dict[str, Any]]:
    """An rFID metric, or None plus an 'unavailable' record naming the file to provide."""
    p = Path(path) if path else checkpoints_dir() / INCEPTION_FILE
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, {"available": False, "file": str(p),
                      "reason": f"rFID: pip install 'kl-autoencoder[fid]' (torch-fidelity), then put its {INCEPTION_FILE} in {p.parent}"}
    if not p.is_file():
        return None, unavailable("rFID", p, f"copy torch-fidelity's {INCEPTION_FILE} there (or pass --inception-weights FILE)")
    return FIDMetric(p), {"available": True, "file": str(p)}
