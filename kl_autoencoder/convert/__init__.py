"""Weights in and out: safe weight-file reading, LDM <-> diffusers keys, strict single-file loading, hub ids, load, export."""

from .export import export, model_card
from .folder import update_config, update_weights, vae_folder
from .hub import HubError, hub_offline, hub_vae_folder, looks_like_repo_id
from .ldm_export import IncompatibleLayoutError, ldm_layout_problems, ldm_metadata, save_ldm
from .ldm_keys import ConversionError, ldm_key, to_ldm_keys, to_ldm_state_dict
from .load import load
from .single_file import (
    convert_state_dict,
    infer_config,
    infer_groups,
    load_file,
    read_vae,
)
from .weight_files import CheckpointError, read_weights

__all__ = [
    "CheckpointError", "ConversionError", "HubError", "IncompatibleLayoutError", "convert_state_dict", "export",
    "hub_offline", "hub_vae_folder", "infer_config", "infer_groups", "ldm_key", "ldm_layout_problems", "ldm_metadata",
    "load", "load_file", "looks_like_repo_id", "model_card", "read_vae", "read_weights", "save_ldm", "to_ldm_keys",
    "to_ldm_state_dict", "update_config", "update_weights", "vae_folder",
]
