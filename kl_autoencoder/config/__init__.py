"""Typed, frozen configuration from YAML presets (``configs/``): model, loss, train and data sections."""

from .presets import configs_dir, list_presets, preset_path
from .schema import (
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    validate,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "TrainConfig", "apply_overrides",
    "config_from_dict", "configs_dir", "list_presets", "load_config", "parse_override", "preset_path", "validate",
]
