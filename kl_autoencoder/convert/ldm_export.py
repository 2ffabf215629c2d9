"""Writing a VAE as one LDM-layout .safetensors file (ComfyUI, AUTOMATIC1111)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL
from safetensors.torch import save_file

from ..errors import InputError
from ..model import resolve_dtype
from ..utils.files import atomic_path
from .ldm_keys import to_ldm_state_dict
from .single_file import META_FIELDS, META_KEY


def ldm_metadata(config: Any) -> dict[str, str]:
    """safetensors metadata: the config fields shapes cannot tell (``META_FIELDS``), read back by ``load_file``."""
    fields = {k: config.get(k) if isinstance(config, dict) else getattr(config, k, None) for k in META_FIELDS}
    meta = {"format": "pt", META_KEY: json.dumps(fields)}
    meta["scaling_factor"] = str(fields["scaling_factor"])
    if fields["shift_factor"] is not None:
        meta["shift_factor"] = str(fields["shift_factor"])
    return meta


def save_ldm(vae: AutoencoderKL, out: str | Path, *, dtype: str = "fp32", force: bool = False) -> Path:
    """Write ``vae`` as one LDM-layout .safetensors (ComfyUI, AUTOMATIC1111); returns the path written.

    The metadata keeps scaling/shift factor, GroupNorm groups and activation, which ``load_file`` reads back.
    """
    torch_dtype = resolve_dtype(dtype)
    out = Path(out)
    if out.suffix == "":
        out = out.with_name(out.name + ".safetensors")
    if out.suffix.lower() != ".safetensors" or out.is_dir():
        raise InputError(f"{out}: an LDM export is one .safetensors file; give a path ending in .safetensors")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists; choose another output, or pass --force (force=True) to replace it")
    tensors = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in to_ldm_state_dict(vae).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # never a half-written file under the final name
        save_file(tensors, str(tmp), metadata=ldm_metadata(vae.config))
    return out
