"""Loading a VAE: a diffusers folder, a pipeline folder, a single weights file, or a Hugging Face Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..model import apply_family, resolve_dtype, vae_class
from .folder import vae_folder
from .hub import hub_vae_folder, looks_like_repo_id
from .single_file import check_values, load_file
from .weight_files import CheckpointError, read_weights


def _no_integer_weights(path: Path) -> None:
    """diffusers casts every weight to the model's float dtype: an integer tensor in the file (quantised, or
    garbage) would load as rounded values without a word. Read the dtypes from the safetensors header first."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # safetensors dtype names: I32, U8, BOOL, F16, BF16, ...; BatchNorm's step counter is an integer by design
            bad = [k for k in f.keys() if f.get_slice(k).get_dtype().upper().startswith(("I", "U", "BOOL"))
                   and not k.endswith("num_batches_tracked")]
    except Exception as e:  # noqa: BLE001 - garbage bytes: safetensors' own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} (and {len(bad) - 1} more) is an integer tensor, not a float weight: "
                              "a cast would change its values; is this a quantised or corrupted checkpoint?")


def _load_folder(path: Path, torch_dtype: torch.dtype | None, allow_nonfinite: bool = False) -> nn.Module:
    """A diffusers VAE folder (or a pipeline's vae/) -> its class (config.json ``_class_name``), from local files only."""
    folder = vae_folder(path)
    if folder is None:
        raise FileNotFoundError(f"{path}: not a diffusers VAE folder (no config.json); export one with `kl-autoencoder export`")
    cfg = folder / "config.json"
    try:
        name = json.loads(cfg.read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError) as e:
        raise FileNotFoundError(f"{cfg}: not a readable config.json ({e})") from None
    weights = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not weights:
        for f in sorted(folder.glob("diffusion_pytorch_model*.bin")):
            read_weights(f, select=lambda keys: [])  # a pickle that needs code is refused here, by name, before diffusers
    for f in weights:
        _no_integer_weights(f)
    try:
        vae = vae_class(name, str(cfg)).from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as e:  # diffusers' own messages can span lines
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{folder}: the diffusers folder does not load ({first[:300]})") from None
    sd = vae.state_dict()
    # NaN/inf only: diffusers has cast every tensor to the model's dtype by now, so integer weights are caught
    # before loading, from the safetensors headers (_no_integer_weights; .bin files are not checked for them)
    check_values(sd, sd, str(folder), allow_nonfinite)
    return vae


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    subfolder: str | None = None,
    offline: bool | None = None,
    family: str | None = None,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a VAE (``AutoencoderKL``, or ``AutoencoderKLFlux2`` for FLUX.2).

    ``path``: a diffusers folder (config.json + weights), a pipeline folder (its ``vae/``), a single weights
    file (.safetensors, .ckpt, .pt, .bin) in diffusers or LDM layout (``single_file.py``), or a Hugging Face
    Hub repo id ``org/name`` (a VAE repo, or a pipeline repo's ``vae`` subfolder; ``revision``, ``subfolder``),
    resolved through huggingface_hub's cache as diffusers' ``from_pretrained`` does: downloaded when online,
    the cache only with ``offline=True`` or ``HF_HUB_OFFLINE=1`` (``hub.py``). A local path wins over a hub id.
    ``family`` (sd1, sd2, sdxl, sdxl-fp16-fix, playground, sd3, flux1, flux2) sets the published latent
    factors and force_upcast (``model/families.py``): for bare weight files, whose factors shapes cannot tell.
    Integer or non-finite weights are refused, naming the key (``allow_nonfinite=True`` lets NaN/inf through).
    """
    p = Path(path)
    torch_dtype = resolve_dtype(dtype) if dtype is not None else None
    if p.is_dir():
        vae = _load_folder(p, torch_dtype, allow_nonfinite)
    elif p.exists():
        vae = load_file(p, family=family, allow_nonfinite=allow_nonfinite)
        family = None  # applied while converting
    elif looks_like_repo_id(str(path)):
        folder = hub_vae_folder(str(path), revision=revision, subfolder=subfolder, offline=offline)
        vae = _load_folder(folder, torch_dtype, allow_nonfinite)
    else:
        raise FileNotFoundError(f"{p}: no such model folder or file (nor a Hugging Face Hub id org/name)")
    if family is not None:
        apply_family(vae, family, str(path))
    vae = vae.to(device)
    if torch_dtype is not None:
        vae = vae.to(torch_dtype)
    return vae.eval()
