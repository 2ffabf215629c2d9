"""Training a VAE: the LDM objective, data, the accelerate trainer, checkpoints, the run directory."""

from .checkpoints import list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from .losses import AutoencoderObjective, NLayerDiscriminator
from .trainer import learning_rate, train

__all__ = [
    "AutoencoderObjective", "NLayerDiscriminator", "learning_rate", "list_checkpoints", "load_checkpoint", "load_latest",
    "save_checkpoint", "train",
]
