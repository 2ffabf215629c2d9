"""kl-autoencoder: train, convert and serve Stable-Diffusion-style KL autoencoders.

The network is ``diffusers.AutoencoderKL``; this package is everything around it.
"""

from .api import (
    check_latents,
    create,
    decode,
    denormalize_latents,
    encode,
    encode_moments,
    export,
    load,
    normalize_latents,
    num_parameters,
    psnr,
    reconstruct,
)
from .config import Config, ConfigError, load_config
from .images import ImageError, load_image, tensor_to_pil as to_pil, tensor_to_uint8 as to_uint8
from .presets import list_presets
from .convert import load_file, save_ldm
from .swap import IncompatibleVAEError, SwapReport, swap_vae
from .fp16 import Fp16Report, check_fp16
from .buckets import BucketBatchSampler, Transform as LatentTransform, make_buckets
from .latent_cache import encode_dataset
from .latent_dataset import LatentDataset
from .stats import LatentStats, compute_latent_stats
from .evaluate import evaluate
from .fastconv import optimize as optimize_inference
from .interpolate import interpolate, slerp
from .score import elbo_bits_per_dim, score_images

__version__ = "0.1.0"

__all__ = [
    "evaluate",
    "interpolate",
    "slerp",
    "score_images",
    "elbo_bits_per_dim",
    "optimize_inference",
    "Fp16Report",
    "IncompatibleVAEError",
    "SwapReport",
    "check_fp16",
    "load_file",
    "save_ldm",
    "swap_vae",
    "BucketBatchSampler",
    "LatentDataset",
    "LatentStats",
    "LatentTransform",
    "compute_latent_stats",
    "encode_dataset",
    "make_buckets",
    "Config",
    "ConfigError",
    "ImageError",
    "check_latents",
    "create",
    "decode",
    "denormalize_latents",
    "encode",
    "encode_moments",
    "export",
    "list_presets",
    "load",
    "load_config",
    "load_image",
    "normalize_latents",
    "num_parameters",
    "psnr",
    "reconstruct",
    "to_pil",
    "to_uint8",
]
