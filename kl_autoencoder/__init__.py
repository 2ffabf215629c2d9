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

__version__ = "0.1.0"

__all__ = [
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
