"""Typed, frozen configuration loaded from YAML presets.

A config has four sections: ``model`` (the diffusers.AutoencoderKL architecture and latent
normalisation), ``loss`` (the LDM objective), ``train`` (optimisation and bookkeeping) and
``data`` (image pipeline). Unknown keys are an error that lists the valid ones, so a typo in a
preset or in ``--set train.lr=1e-4`` never passes silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError


class ConfigError(InputError):
    """A preset or override that does not fit the schema."""


ARCHITECTURES = ("AutoencoderKL", "AutoencoderKLFlux2")  # the diffusers classes a preset may build


@dataclass(frozen=True)
class ModelConfig:
    """diffusers.AutoencoderKL (or AutoencoderKLFlux2) arguments plus the latent normalisation.

    AutoencoderKL: ``(z - shift) * scale``, or per channel ``(z - latents_mean) * scale / latents_std``
    (Playground v2.5) when both lists are set. AutoencoderKLFlux2 (FLUX.2): BatchNorm running statistics
    over 2x2 latent patches (``batch_norm_eps``, ``patch_size``); the scalar factors do not apply.
    """

    architecture: str = "AutoencoderKL"  # or "AutoencoderKLFlux2"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one block per level: f = 2**(n-1)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215  # SD 1.x/2.x VAE; recompute with `kl-autoencoder stats` for a new VAE
    shift_factor: float | None = None  # SD3/FLUX layout subtracts a mean before scaling
    latents_mean: tuple[float, ...] | None = None  # per-channel normalisation (Playground v2.5), with latents_std
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    batch_norm_eps: float = 1e-4  # AutoencoderKLFlux2 only (diffusers default, FLUX.2's config)
    batch_norm_momentum: float = 0.1  # AutoencoderKLFlux2 only
    patch_size: tuple[int, int] = (2, 2)  # AutoencoderKLFlux2 only: latents are patchified 2x2 before BatchNorm
    seed: int = 0  # weight init seed: create() is deterministic

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        common = dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            block_out_channels=tuple(self.block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            act_fn=self.act_fn,
            sample_size=self.sample_size,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention,
        )
        if self.architecture == "AutoencoderKLFlux2":
            return dict(common, batch_norm_eps=self.batch_norm_eps, batch_norm_momentum=self.batch_norm_momentum,
                        patch_size=tuple(self.patch_size))
        return dict(common, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor,
                    latents_mean=self.latents_mean, latents_std=self.latents_std, force_upcast=self.force_upcast)


@dataclass(frozen=True)
class LossConfig:
    """The LDM objective (CompVis ldm/modules/losses/contperceptual.py, LPIPSWithDiscriminator)."""

    reconstruction: str = "l1"  # "l1" | "l2"
    perceptual: str = "lpips-vgg"  # "lpips-vgg" | "lpips-alex" | "none"
    perceptual_weight: float = 1.0
    colour_weight: float = 0.0  # extra weight on each image's per-channel mean error (issue 18); 0: LDM's loss
    lpips_weights: str | None = None  # path to vgg16-397923af.pth; default $TORCH_HOME/hub/checkpoints
    kl_weight: float = 1e-6
    kl_warmup_steps: int = 0  # linear warm-up of the KL weight from 0
    learn_logvar: bool = False  # LDM: nll = rec / exp(logvar) + logvar
    logvar_init: float = 0.0
    sample_posterior: bool = True  # decode a posterior sample (LDM) rather than the mean
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "batch"  # "batch" | "group" | "none"
    adaptive_weight: bool = True  # False: fixed GAN weight disc_weight


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 4.5e-6
    scale_lr: bool = True  # LDM main.py: lr = accumulate * num_processes * batch_size * base_lr
    disc_lr: float | None = None  # None: same as lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # "constant" | "cosine"
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 100_000
    max_minutes: float | None = None
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    grad_clip: float | None = None
    ema_decay: float | None = None  # e.g. 0.9999 (sd-vae-ft-ema); None: no EMA
    # the run's export (and its final validation) holds the EMA weights (True) or the live ones (False; the EMA is
    # still kept in checkpoints). At the end of a cosine-to-zero schedule the live weights are the schedule's end
    # point, while an EMA of horizon 1 / (1 - decay) steps still averages in weights from higher learning rates.
    export_ema: bool = True
    decoder_only: bool = False  # freeze encoder + quant_conv (sd-vae-ft-mse)
    seed: int = 0
    deterministic: bool = False  # deterministic CUDA kernels (cuDNN, cuBLAS, scatter-adds): exact resume on a GPU, slower
    log_every: int = 10
    image_every: int = 500
    eval_every: int = 1000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 2
    init_from: str | None = None  # a model path to fine-tune


@dataclass(frozen=True)
class DataConfig:
    crop_size: int = 256  # training crops (and validation's centre crops)
    # Issue 18: a crop size per micro-batch drawn from these (keyed by seed and micro-batch), so GroupNorm
    # sees the image sizes it will be used at (a model trained on 320 px crops only moved the mean colour of
    # 128 px images by up to 18 levels of 255). None: every crop is crop_size.
    crop_sizes: tuple[int, ...] | None = None
    random_flip: bool = True
    small_images: str = "upscale"  # "upscale" | "skip": images with a short side under crop_size
    min_size: int = 8  # images with a short side under this are skipped whatever small_images says
    resize: int | None = None  # resize the short side to this before cropping; None: crop at native resolution
    val_dir: str | None = None
    val_images: int = 16


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    name: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (already resolved), converting lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    m, lo = cfg.model, cfg.loss
    problems = []
    if len(m.block_out_channels) < 1:
        problems.append("model.block_out_channels must have at least one entry")
    if any(c % m.norm_num_groups for c in m.block_out_channels):
        problems.append(
            f"model.block_out_channels {list(m.block_out_channels)} must all be divisible by "
            f"model.norm_num_groups={m.norm_num_groups}"
        )
    if m.scaling_factor <= 0:
        problems.append("model.scaling_factor must be > 0")
    if m.architecture not in ARCHITECTURES:
        problems.append(f"model.architecture={m.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    if (m.latents_mean is None) != (m.latents_std is None) or (
            m.latents_mean is not None and not len(m.latents_mean) == len(m.latents_std) == m.latent_channels):
        problems.append(f"model.latents_mean and model.latents_std: give both, {m.latent_channels} values each (one per latent channel)")
    if m.architecture == "AutoencoderKLFlux2" and m.latents_mean is not None:
        problems.append("model.latents_mean/latents_std: AutoencoderKLFlux2 normalises with its BatchNorm statistics instead")
    choices = {
        "loss.reconstruction": (lo.reconstruction, ("l1", "l2")),
        "loss.perceptual": (lo.perceptual, ("lpips-vgg", "lpips-alex", "none")),
        "loss.disc_loss": (lo.disc_loss, ("hinge", "vanilla")),
        "loss.disc_norm": (lo.disc_norm, ("batch", "group", "none")),
        "train.mixed_precision": (cfg.train.mixed_precision, ("no", "fp16", "bf16")),
        "train.lr_schedule": (cfg.train.lr_schedule, ("constant", "cosine")),
        "data.small_images": (cfg.data.small_images, ("upscale", "skip")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            problems.append(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    if lo.colour_weight < 0:
        problems.append(f"loss.colour_weight={lo.colour_weight}: must be >= 0 (0 turns the mean-colour term off)")
    for size in (cfg.data.crop_size,) + (cfg.data.crop_sizes or ()):
        if size % 8 or size < 8:
            problems.append(f"data.crop_size(s)={size} must be a positive multiple of 8")
    if cfg.data.crop_sizes is not None and not cfg.data.crop_sizes:
        problems.append("data.crop_sizes=[]: give at least one size, or null for crop_size only")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML reads 1e-4 as a string (YAML 1.1 needs a dot); accept it as a number
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _to_plain(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_config(preset: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a preset name (``"tiny-kl-f8"``) or YAML path, apply ``--set`` overrides, validate."""
    from .presets import preset_path

    path = preset_path(preset)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path))
