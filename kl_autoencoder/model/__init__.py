"""The network and its latent space: create a VAE, dtypes, normalisation, posterior, raw passes, the shipped model."""

from .create import create, model_summary, num_parameters
from .dtypes import DTYPE_NAMES, DTYPES, resolve_dtype
from .layout import downsample_factor
from .normalization import denormalize_latents, normalize_latents
from .passes import decode_raw, encoder_moments
from .posterior import kl_divergence, sample, split_moments
from .shipped import DEFAULT_MODEL_NAME, default_model_path

__all__ = [
    "DEFAULT_MODEL_NAME", "DTYPES", "DTYPE_NAMES", "create", "decode_raw", "default_model_path", "denormalize_latents",
    "downsample_factor", "encoder_moments", "kl_divergence", "model_summary", "normalize_latents", "num_parameters",
    "resolve_dtype", "sample", "split_moments",
]
