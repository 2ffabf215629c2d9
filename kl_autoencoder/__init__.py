"""kl-autoencoder: train, convert and serve Stable-Diffusion-style KL autoencoders.

The network is ``diffusers.AutoencoderKL``; this package is everything around it, in subpackages by
role. Imports run one way, each layer using only the layers before it:

    errors, settings, utils/, config/      shared pieces: error classes, switches, files, seeds, images, presets
    model/                                 create a VAE; dtypes, latent normalisation and families, posterior, raw passes, shipped model
    convert/                               weight files in and out: safe reading, LDM <-> diffusers keys, hub ids, load, export
    inference/                             encode/decode/reconstruct, memory planning, tiling, fast CPU paths
    latents/                               latent caches: format, encode job, dataset, buckets, statistics
    evaluation/                            metrics, LPIPS, rFID, report, anomaly scores, precision checks, interpolation
    training/                              the LDM objective, data, trainer, checkpoints, run directory
    pipelines/                             VAE swap in diffusers pipelines, tiny pipelines
    cli/                                   the `kl-autoencoder` command, one module per subcommand

Nothing below ``cli/`` imports argparse or ``cli``. ``import kl_autoencoder as ka`` gives the Python API below.
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, list_presets, load_config
from .convert import export, load, load_file, save_ldm
from .errors import InputError, KLAutoencoderError
from .evaluation import (
    Fp16Report,
    check_fp16,
    elbo_bits_per_dim,
    evaluate,
    interpolate,
    psnr,
    score_images,
    slerp,
)
from .inference import check_latents, decode, empty_cache, encode, encode_moments, reconstruct
from .inference import optimize as optimize_inference
from .latents import (
    BucketBatchSampler,
    LatentDataset,
    LatentStats,
    compute_latent_stats,
    encode_dataset,
    make_buckets,
)
from .latents import Transform as LatentTransform
from .model import create, denormalize_latents, normalize_latents, num_parameters
from .pipelines import IncompatibleVAEError, SwapReport, swap_vae
from .utils.images import ImageError, load_image
from .utils.images import tensor_to_pil as to_pil
from .utils.images import tensor_to_uint8 as to_uint8

__all__ = [
    "empty_cache",
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
    "InputError",
    "KLAutoencoderError",
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
