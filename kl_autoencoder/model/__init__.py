"""The network and its latent space: create a VAE, dtypes, normalisation, families, posterior, raw passes, the shipped model."""

from .create import VAE_CLASSES, create, is_vae, model_summary, num_parameters, vae_class
from .dtypes import DTYPE_NAMES, DTYPES, resolve_dtype
from .families import FAMILIES, apply_family, check_family, get_family
from .layout import downsample_factor, latent_patch, normalized_channels, size_multiple
from .normalization import (
    LatentNormalization,
    denormalize_latents,
    latent_normalization,
    normalization_from_manifest,
    normalize_latents,
    patchify,
    unpatchify,
)
from .passes import decode_raw, encoder_moments
from .posterior import kl_divergence, sample, split_moments
from .shipped import DEFAULT_MODEL_NAME, default_model_path

__all__ = [
    "DEFAULT_MODEL_NAME", "DTYPES", "DTYPE_NAMES", "FAMILIES", "LatentNormalization", "VAE_CLASSES", "apply_family",
    "check_family", "create", "decode_raw", "default_model_path", "denormalize_latents", "downsample_factor",
    "encoder_moments", "get_family", "is_vae", "kl_divergence", "latent_normalization", "latent_patch", "model_summary",
    "normalization_from_manifest", "normalize_latents", "normalized_channels", "num_parameters", "patchify",
    "resolve_dtype", "sample", "size_multiple", "split_moments", "unpatchify", "vae_class",
]
