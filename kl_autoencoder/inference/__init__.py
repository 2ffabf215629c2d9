"""Running a VAE: encode/decode/reconstruct, memory planning, exact and approximate tiling, fast CPU paths."""

from .codec import (
    TILING_MODES,
    check_latents,
    decode,
    encode,
    encode_moments,
    reconstruct,
)
from .fastconv import optimize
from .malloc import release as empty_cache  # CPU memory kept between calls, back to the OS

__all__ = ["TILING_MODES", "check_latents", "decode", "empty_cache", "encode", "encode_moments", "optimize", "reconstruct"]
