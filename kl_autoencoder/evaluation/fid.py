"""rFID: Frechet Inception distance between originals and reconstructions (torchmetrics + torch-fidelity).

torch-fidelity's Inception weights are never downloaded here: when the file is missing the metric is
reported unavailable together with the file to provide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lpips import checkpoints_dir, unavailable

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3



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
