"""Names of the floating-point dtypes a VAE runs or is stored in."""

from __future__ import annotations

import torch

from ..errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp16"`` or ``torch.float16`` -> ``torch.float16``; anything else is an InputError naming the choices."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise InputError(f"dtype {dtype}: choose one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
