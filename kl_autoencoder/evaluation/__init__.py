"""Measuring a VAE: pixel metrics, LPIPS, rFID, the evaluation report, anomaly scores, half-precision checks,
latent interpolation, and the test images they use."""

from .anomaly import ScoreReport, elbo_bits_per_dim, score_images, write_csv
from .interpolation import interpolate, lerp, slerp
from .metrics import psnr, psnr_uint8, ssim_uint8
from .precision import Fp16Report, check_fp16, set_force_upcast
from .report import evaluate, to_markdown
from .samples import load_sample_images, synthetic_images

__all__ = [
    "Fp16Report", "ScoreReport", "check_fp16", "elbo_bits_per_dim", "evaluate", "interpolate", "lerp",
    "load_sample_images", "psnr", "psnr_uint8", "score_images", "set_force_upcast", "slerp", "ssim_uint8",
    "synthetic_images", "to_markdown", "write_csv",
]
