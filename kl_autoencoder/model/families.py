"""The published KL-VAE families: latent normalisation and fp16 behaviour a bare weights file cannot tell.

A weights file holds tensors only, and SD 1.x, SD 2.x, SDXL and Playground v2.5 share one architecture,
as do SD3 and FLUX.1 (16 channels, no quant convs): the factors cannot be read from shapes. ``--family``
(``family=`` in Python) sets them from this table. Hugging Face pipeline repos carry the same values in
``vae/config.json``; where those files cannot be read here, each entry cites the upstream source of the
number (the model's own inference config or reference code, and ComfyUI's ``comfy/latent_formats.py``,
which hard-codes every family's factors).

``force_upcast`` (diffusers runs the VAE in fp32 under an fp16 pipeline when it is true): diffusers'
AutoencoderKL default is true and the SD 1.x/2.x, SDXL, SD3 and FLUX.1 configs keep it; only the SDXL
fp16-fix VAE sets it false, having been fine-tuned so its activations stay finite in fp16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import InputError

# ComfyUI comfy/latent_formats.py (commit 040a324) class names, cited per entry as "ComfyUI <class>"
_COMFY = "ComfyUI comfy/latent_formats.py"
# diffusers 0.42 utils/remote_utils.py, remote_decode's docstring: "SD v1: 0.18215, SD XL: 0.13025, Flux: 0.3611" (+ shift 0.1159)
_DIFFUSERS = "diffusers utils/remote_utils.py remote_decode docstring"


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the diffusers class
    latent_channels: int
    fields: dict[str, Any] = field(default_factory=dict)  # config fields to set
    source: str = ""


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sd1", "AutoencoderKL", 4,
           {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True},
           "CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml scale_factor: 0.18215; "
           f"{_COMFY} SD15; {_DIFFUSERS} (SD v1); runwayml/stable-diffusion-v1-5 vae/config.json scaling_factor 0.18215"),
    Family("sd2", "AutoencoderKL", 4,
           {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True},
           "Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml scale_factor: 0.18215; "
           "stabilityai/stable-diffusion-2-1 vae/config.json scaling_factor 0.18215"),
    Family("sdxl", "AutoencoderKL", 4,
           {"scaling_factor": 0.13025, "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True},
           "Stability-AI/generative-models configs/inference/sd_xl_base.yaml scale_factor: 0.13025; "
           f"{_COMFY} SDXL; {_DIFFUSERS} (SD XL); stabilityai/sdxl-vae config.json (force_upcast: the SDXL VAE overflows in fp16, "
           "diffusers pipeline_stable_diffusion_xl.py upcasts it)"),
    Family("sdxl-fp16-fix", "AutoencoderKL", 4,
           {"scaling_factor": 0.13025, "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": False},
           "madebyollin/sdxl-vae-fp16-fix config.json: SDXL's scaling_factor 0.13025 and force_upcast false "
           "(fine-tuned so fp16 activations stay finite)"),
    Family("playground", "AutoencoderKL", 4,
           {"scaling_factor": 0.5, "shift_factor": None, "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
            "latents_std": [8.4927, 5.9022, 6.5498, 5.2299], "force_upcast": True},
           f"playgroundai/playground-v2.5-1024px-aesthetic vae/config.json, as in {_COMFY} SDXL_Playground_2_5 "
           "(scale_factor 0.5, latents_mean/latents_std); the SDXL VAE architecture, so force_upcast as sdxl"),
    Family("sd3", "AutoencoderKL", 16,
           {"scaling_factor": 1.5305, "shift_factor": 0.0609, "latents_mean": None, "latents_std": None, "force_upcast": True},
           "stabilityai/stable-diffusion-3-medium-diffusers vae/config.json scaling_factor 1.5305, shift_factor 0.0609; "
           f"SD3 reference sd3_impls.py SD3LatentFormat; {_COMFY} SD3"),
    Family("flux1", "AutoencoderKL", 16,
           {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None, "latents_std": None, "force_upcast": True},
           "black-forest-labs/flux src/flux/util.py AutoEncoderParams(scale_factor=0.3611, shift_factor=0.1159); "
           f"black-forest-labs/FLUX.1-dev vae/config.json; {_COMFY} Flux; {_DIFFUSERS} (Flux)"),
    Family("flux2", "AutoencoderKLFlux2", 32, {"batch_norm_eps": 1e-4, "patch_size": (2, 2)},
           "diffusers AutoencoderKLFlux2 defaults = black-forest-labs/FLUX.2-dev vae/config.json (batch_norm_eps 1e-4, "
           "patch_size [2, 2], 32 latent channels); the normalisation itself is the file's BatchNorm buffers "
           "bn.running_mean/bn.running_var (diffusers pipelines/flux2/pipeline_flux2.py _encode_vae_image)"),
]}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise InputError(f"family {name!r}: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def check_family(family: Family, architecture: str, latent_channels: int, where: str) -> None:
    """Refuse a family whose class or latent channels differ from the model's (the factors would be wrong)."""
    if architecture != family.architecture or latent_channels != family.latent_channels:
        raise InputError(f"{where}: a {architecture} with {latent_channels} latent channels, but --family {family.name} "
                         f"is a {family.architecture} with {family.latent_channels}; choose another family")


def apply_family(vae: nn.Module, name: str, where: str = "MODEL") -> nn.Module:
    """Set ``vae``'s config fields (factors, force_upcast) to the family's; returns ``vae``."""
    family = get_family(name)
    check_family(family, type(vae).__name__, int(vae.config.latent_channels), where)
    vae.register_to_config(**family.fields)
    return vae
