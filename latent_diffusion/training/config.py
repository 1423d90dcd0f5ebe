"""Training experiments as YAML files mapped onto dataclasses, with ``key=value`` overrides.

A file has the sections of :class:`ExperimentConfig`; every key is checked against the dataclass
field it lands on (unknown keys and wrong types are errors that name the key), so that a typo
fails before any image is read instead of silently training with a default.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from latent_diffusion.config import AutoencoderConfig, ConfigError, ScheduleConfig, UNetConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they become training tensors."""

    root: str = ""  # folder of images; captions as same-name .txt files or metadata.jsonl
    size: int = 256  # side of the square training crop
    crop: Literal["center", "random"] = "random"
    flip: bool = True
    # Shorter side is resized to ``size`` first; images smaller than that are an error unless allowed.
    allow_upscale: bool = False
    class_labels: bool = False  # labels from first-level sub-folder names
    num_workers: int = 0
    validation_fraction: float = 0.0  # held-out share of the files, for reconstruction metrics
    max_validation_images: int = 64


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, the learning-rate schedule, and what makes a step cheaper or more stable."""

    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999  # 0 disables EMA
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPUs that support it
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Length, batch, seed, and the cadence of logs, samples and checkpoints."""

    out_dir: str = "runs/experiment"
    max_steps: int = 1000
    batch_size: int = 8  # global batch per optimiser step (all ranks, all accumulation steps)
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    log_every: int = 10
    sample_every: int = 0  # 0: no sample grids
    num_samples: int = 4
    validate_every: int = 0  # 0: no validation
    checkpoint_every: int = 500
    keep_last: int = 3
    resume: bool = True  # continue from the newest readable checkpoint in out_dir (README: Training)
    progress: bool = True
    inception_weights: str | None = None  # TorchScript Inception feature extractor for rFID


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Stage-1 loss: L1 + perceptual + KL or codebook + PatchGAN hinge (Esser et al., Rombach et al.)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0  # mean squared error; favours small, sparse objects that L1's median ignores
    perceptual_weight: float = 1.0
    lpips_weights: str | None = None  # local LPIPS file (linear heads, optionally the VGG16 too)
    vgg_weights: str | None = None  # local torchvision VGG16 state dict, if the LPIPS file lacks it
    kl_weight: float = 1e-6
    # KL only: start the posterior's log-variance head at this value (e.g. -6, std 0.05) instead of
    # about 0, so early latents are not drowned in sampling noise the decoder then learns to ignore.
    logvar_init: float | None = None
    codebook_weight: float = 1.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # default: the generator's lr


@dataclass(frozen=True)
class ConditionerSettings:
    """The condition encoder of a stage-2 model and how it is trained."""

    kind: Literal["none", "text", "clip", "class"] = "none"
    # text: a BERTEmbedder-layout transformer trained from scratch over the CLIP BPE vocabulary.
    n_embed: int = 512
    n_layer: int = 8
    max_seq_len: int = 77
    # clip: a frozen CLIP text encoder read from ``checkpoint`` (an SD single file).
    checkpoint: str | None = None
    n_classes: int = 0  # class: number of labels (one more is added for the "no class" token)
    drop_prob: float = 0.1  # condition dropout for classifier-free guidance
    # text: weights to start from instead of random ones (BERTEmbedder keys, e.g. the output of
    # ``python -m latent_diffusion.training.shapes_text``), and the encoder's learning rate as a
    # fraction of optim.lr (0 keeps it frozen).
    init: str | None = None
    lr_scale: float = 1.0


@dataclass(frozen=True)
class LDMSettings:
    """Stage 2: the denoiser, its frozen first stage and the training objective."""

    task: Literal["txt2img", "class", "unconditional", "superres", "inpainting"] = "txt2img"
    first_stage: str = ""  # stage-1 output (.safetensors) or an SD single file
    init_checkpoint: str | None = None  # SD 1.x/2.x (or our own) single file to fine-tune
    init_config: str | None = None  # CompVis YAML for init_checkpoint when its family cannot be detected
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(context_dim=None, use_spatial_transformer=False))
    conditioner: ConditionerSettings = field(default_factory=ConditionerSettings)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Literal["eps", "v", "x0"] = "eps"
    min_snr_gamma: float | None = None  # Hang et al. 2023 loss weighting; None: plain MSE
    scale_factor: float | None = None  # None: 1 / std of the first batch's latents (Rombach et al. 4.3.2)
    latent_cache: str | None = None  # file written by ``ldm cache-latents``
    sample_steps: int = 25
    guidance_scale: float = 3.0


@dataclass(frozen=True)
class LoraSettings:
    """``stage: lora``: low-rank factors trained beside the frozen weights of ``ldm.init_checkpoint``."""

    rank: int = 16
    alpha: float = 8.0  # the change is scaled by alpha / rank (kohya's network_alpha)
    # Layers of the UNet to adapt, by kind (training/lora.py: UNET_TARGETS); text_targets adapts the
    # text encoder's too (empty: it stays as it is).
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
    text_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ControlNetSettings:
    """A ControlNet trained beside a frozen text-to-image model (``stage: controlnet``)."""

    base_model: str = ""  # the model it steers: a single file, or "builtin" for the shipped shapes model
    # The control map each training image gets, made by the package's preprocessor at the image's size.
    preprocessor: Literal["canny", "threshold", "scribble_xdog"] = "canny"
    threshold_a: float | None = None  # the preprocessor's settings; None: its defaults (canny: 100 and 200)
    threshold_b: float | None = None
    # The hint encoder's widths; None: the release's (16, 32, 96, 256) cut to the autoencoder's factor.
    hint_widths: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """One training run: which stage, the model, the data, the optimiser and the run's cadence."""

    stage: Literal["autoencoder", "ldm", "lora", "controlnet"] = "autoencoder"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    ldm: LDMSettings = field(default_factory=LDMSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    controlnet: ControlNetSettings = field(default_factory=ControlNetSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` (lists to tuples, ints to floats), or a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} does not fit {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(_check_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return build_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads exponent numbers without a dot, such as 1e-4, as strings.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def build_dataclass(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Instance of ``cls`` from a mapping, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; {where or 'top level'} accepts {names}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _apply_override(raw: dict, cls: type, path: list[str], value: Any, text: str) -> None:
    node, node_cls = raw, cls
    for depth, name in enumerate(path):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if name not in names:
            where = ".".join(path[:depth]) or "top level"
            raise ConfigError(f"override {text!r}: unknown key {'.'.join(path[: depth + 1])!r}; {where} accepts {names}")
        if depth == len(path) - 1:
            node[name] = value
            return
        field_type = typing.get_type_hints(node_cls)[name]
        if not dataclasses.is_dataclass(field_type):
            raise ConfigError(f"override {text!r}: {'.'.join(path[: depth + 1])!r} is not a section")
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(path[: depth + 1])!r} is not a section in the file")
        node_cls = field_type


def load_experiment(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (or start from defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        raw = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(raw, ExperimentConfig, keys, value, text)
    return build_dataclass(ExperimentConfig, raw)


def to_plain(config: Any) -> Any:
    """A dataclass tree as plain dicts and lists (for YAML, JSON and checkpoints)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_plain(v) for v in config]
    return config


def validate_experiment(config: ExperimentConfig) -> None:
    """Checks that need no data: batch divisibility, positive lengths, required paths."""
    run, optim = config.run, config.optim
    if run.max_steps < 1:
        raise ConfigError(f"run.max_steps must be >= 1, got {run.max_steps}")
    if run.batch_size < 1 or optim.grad_accum < 1:
        raise ConfigError("run.batch_size and optim.grad_accum must be >= 1")
    if run.keep_last < 1:
        raise ConfigError(f"run.keep_last must be >= 1, got {run.keep_last}")
    if not config.data.root:
        raise ConfigError("data.root: set the folder of training images")
    if config.data.size < 8:
        raise ConfigError(f"data.size must be >= 8, got {config.data.size}")
    if config.stage == "lora":
        from latent_diffusion.training.lora import validate_lora_settings

        validate_lora_settings(config)
    if config.stage in ("ldm", "lora"):
        ldm = config.ldm
        if not ldm.first_stage and not ldm.init_checkpoint:
            raise ConfigError("ldm.first_stage: set the trained autoencoder (stage-1 output) or ldm.init_checkpoint")
        if ldm.task == "txt2img" and ldm.conditioner.kind not in ("text", "clip"):
            raise ConfigError("ldm.task=txt2img needs ldm.conditioner.kind 'text' or 'clip'")
        if ldm.task == "class" and (ldm.conditioner.kind != "class" or ldm.conditioner.n_classes < 1):
            raise ConfigError("ldm.task=class needs ldm.conditioner.kind=class and n_classes >= 1")
        if not 0.0 <= ldm.conditioner.drop_prob < 1.0:
            raise ConfigError(f"ldm.conditioner.drop_prob must lie in [0, 1), got {ldm.conditioner.drop_prob}")
        if ldm.conditioner.lr_scale < 0:
            raise ConfigError(f"ldm.conditioner.lr_scale must be >= 0, got {ldm.conditioner.lr_scale}")
        if ldm.conditioner.init is not None and ldm.conditioner.kind != "text":
            raise ConfigError("ldm.conditioner.init: only a from-scratch text encoder (kind: text) starts from a file")
