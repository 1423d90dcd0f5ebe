"""Map a CompVis / Stability inference YAML (``v1-inference.yaml``, ``v2-inference-v.yaml`` ...) onto a ModelSpec.

Only what changes the network or the diffusion process is read. Every other key must be one we
know to be harmless here -- training, logging and data options (``use_checkpoint``, ``monitor``,
``first_stage_key`` ...), or options whose value is the reference default -- and is otherwise an
error: a key we do not model might change the architecture, and silently ignoring it would load
wrong weights into the wrong shapes or run the right weights wrongly.

Keys left out of the YAML take the reference constructors' defaults (CompVis ``UNetModel``,
``Encoder``/``Decoder``, ``DDPM``), which are not our presets' values: e.g. a UNet without
``use_spatial_transformer`` has none, as in the reference.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from latent_diffusion.config import (
    CLIP_L, OPENCLIP_H, AutoencoderConfig, BERTTextConfig, ClassEmbedderConfig, ConditionerConfig, ConfigError,
    ModelSpec, ScheduleConfig, UNetConfig, from_mapping,
)

# Options that only affect training, logging, data loading, memory or the attention kernel.
_HARMLESS_MODEL_PARAMS = frozenset({
    "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "image_size", "channels",
    "cond_stage_trainable", "monitor", "use_ema", "loss_type", "scheduler_config", "ckpt_path", "ignore_keys",
    "load_only_unet", "learn_logvar", "logvar_init", "l_simple_weight", "original_elbo_weight", "v_posterior",
    "clip_denoised", "low_scale_key", "make_it_fit", "reset_ema", "reset_num_ema_updates", "scale_by_std",
    "use_positional_encodings", "cond_stage_forward", "base_learning_rate", "unet_trainable", "ucg_training",
    "force_null_conditioning", "finetune_keys", "concat_keys", "masked_image_key", "c_concat_log_start",
    "c_concat_log_end",
})
_HARMLESS_UNET_PARAMS = frozenset({"use_checkpoint", "image_size", "use_fp16", "use_bf16", "spatial_transformer_attn_type"})
# Options we support only at the reference default, with that default.
_UNET_DEFAULT_ONLY = {"num_heads_upsample": -1, "use_new_attention_order": False, "num_attention_blocks": None,
                      "adm_in_channels": None, "n_embed": None}
_HARMLESS_FIRST_STAGE_PARAMS = frozenset({
    "lossconfig", "monitor", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "batch_resize_range",
    "scheduler_config", "lr_g_factor", "use_ema",
})
_DDCONFIG_DEFAULT_ONLY = {"use_linear_attn": False, "give_pre_end": False, "tanh_out": False, "resamp_with_conv": True}

# The reference UNetModel's constructor defaults, where they differ from UNetConfig's.
_COMPVIS_UNET_DEFAULTS = dict(
    num_heads=-1, num_head_channels=-1, use_spatial_transformer=False, context_dim=None, transformer_depth=1,
    use_linear_in_transformer=False, legacy=True, channel_mult=(1, 2, 4, 8),
)
# CompVis ``make_beta_schedule`` names -> ours ("linear" there is linear in sqrt(beta)).
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
_CONDITIONING_KEYS = {"crossattn": "crossattn", "concat": "concat", "hybrid": "hybrid", "hybrid-adm": "hybrid"}


def _section(mapping: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = mapping.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: missing section {key!r}")
    return value


def _split_params(params: Mapping[str, Any], known: set[str], harmless: frozenset[str],
                  default_only: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The modelled keys of ``params``; harmless ones dropped, anything else an error naming it."""
    kept = {}
    for key, value in params.items():
        if key in known:
            kept[key] = value
        elif key in harmless:
            continue
        elif key in default_only:
            if value != default_only[key]:
                raise ConfigError(f"{where}: {key}={value!r} is not supported (only {default_only[key]!r})")
        else:
            raise ConfigError(f"{where}: unknown key {key!r}; it may change the model, so it is not ignored")
    return kept


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unet_config(section: Mapping[str, Any]) -> UNetConfig:
    params = dict(section.get("params") or {})
    kept = _split_params(params, _field_names(UNetConfig), _HARMLESS_UNET_PARAMS, _UNET_DEFAULT_ONLY, "unet_config")
    return from_mapping(UNetConfig, {**_COMPVIS_UNET_DEFAULTS, **kept})


def _autoencoder_config(section: Mapping[str, Any]) -> AutoencoderConfig:
    target = str(section.get("target", ""))
    name = target.rsplit(".", 1)[-1]
    if name == "AutoencoderKL":
        kind = "kl"
    elif name in ("VQModel", "VQModelInterface"):
        kind = "vq"
    else:
        raise ConfigError(f"first_stage_config: unsupported target {target!r} (AutoencoderKL or VQModel)")
    params = dict(section.get("params") or {})
    ddconfig = dict(params.pop("ddconfig", None) or {})
    fields = _field_names(AutoencoderConfig)
    top = _split_params(params, fields, _HARMLESS_FIRST_STAGE_PARAMS, {}, "first_stage_config.params")
    inner = _split_params(ddconfig, fields, frozenset(), _DDCONFIG_DEFAULT_ONLY, "first_stage_config.params.ddconfig")
    return from_mapping(AutoencoderConfig, {"kind": kind, **inner, **top})


def _conditioner_config(section: Any) -> tuple[ConditionerConfig, str | None]:
    """(encoder config, the conditioning it implies when ``conditioning_key`` is absent)."""
    if section in ("__is_first_stage__", "__is_unconditional__"):
        return None, ("concat" if section == "__is_first_stage__" else "none")
    if not isinstance(section, Mapping):
        raise ConfigError(f"cond_stage_config: expected a mapping or a CompVis marker, got {section!r}")
    target = str(section.get("target", ""))
    name = target.rsplit(".", 1)[-1]
    params = dict(section.get("params") or {})
    where = f"cond_stage_config ({name})"
    if target == "torch.nn.Identity":
        return None, None
    if name == "FrozenCLIPEmbedder":
        kept = _split_params(params, {"layer", "max_length"}, frozenset({"version", "device", "freeze"}),
                             {"layer_idx": None}, where)
        if kept.get("layer", "last") != "last":
            raise ConfigError(f"{where}: only layer='last' is supported, got {kept['layer']!r}")
        return dataclasses.replace(CLIP_L, context_length=kept.get("max_length", 77)), None
    if name == "FrozenOpenCLIPEmbedder":
        kept = _split_params(params, {"arch", "layer", "max_length"}, frozenset({"version", "device", "freeze"}), {}, where)
        if kept.get("arch", "ViT-H-14") != "ViT-H-14":
            raise ConfigError(f"{where}: only arch='ViT-H-14' is supported, got {kept['arch']!r}")
        layer = kept.get("layer", "last")
        if layer not in ("last", "penultimate"):
            raise ConfigError(f"{where}: layer must be 'last' or 'penultimate', got {layer!r}")
        return dataclasses.replace(
            OPENCLIP_H, skip_last_layers=1 if layer == "penultimate" else 0,
            context_length=kept.get("max_length", 77),
        ), None
    if name == "ClassEmbedder":
        kept = _split_params(params, {"embed_dim", "n_classes"}, frozenset({"key", "ucg_rate"}), {}, where)
        return from_mapping(ClassEmbedderConfig, kept), None
    if name == "BERTEmbedder":
        kept = _split_params(params, {"n_embed", "n_layer", "vocab_size", "max_seq_len"},
                             frozenset({"device", "embedding_dropout"}), {"use_tokenizer": True}, where)
        return from_mapping(BERTTextConfig, kept), None
    raise ConfigError(f"cond_stage_config: unsupported target {target!r}")


def _schedule(params: Mapping[str, Any], where: str) -> ScheduleConfig:
    beta_schedule = params.get("beta_schedule", "linear")
    if beta_schedule not in _BETA_SCHEDULES:
        raise ConfigError(f"{where}: beta_schedule {beta_schedule!r} is not supported ({sorted(_BETA_SCHEDULES)})")
    return ScheduleConfig(
        kind=_BETA_SCHEDULES[beta_schedule], timesteps=int(params.get("timesteps", 1000)),
        linear_start=float(params.get("linear_start", 1e-4)), linear_end=float(params.get("linear_end", 2e-2)),
    )


def _read(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def spec_from_yaml(source: str | os.PathLike | Mapping[str, Any], family: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` a CompVis-format YAML describes; ``family`` names it (default "custom")."""
    data = _read(source)
    model = _section(data, "model", "YAML")
    params = dict(model.get("params") or {})
    modelled = {"unet_config", "first_stage_config", "cond_stage_config", "low_scale_config", "linear_start",
                "linear_end", "timesteps", "beta_schedule", "parameterization", "scale_factor",
                "conditioning_key", "concat_mode", "cosine_s", "given_betas"}
    _split_params(params, modelled, _HARMLESS_MODEL_PARAMS, {}, "model.params")
    if params.get("given_betas") is not None:
        raise ConfigError("model.params: given_betas (an explicit beta list) is not supported")
    if "cosine_s" in params and params["cosine_s"] != 8e-3:
        raise ConfigError("model.params: only cosine_s=0.008 is supported")

    conditioner, implied = _conditioner_config(params.get("cond_stage_config", "__is_unconditional__"))
    key = params.get("conditioning_key")
    if key is None:
        conditioning = implied or ("concat" if params.get("concat_mode", True) else "crossattn")
    elif key in _CONDITIONING_KEYS:
        conditioning = _CONDITIONING_KEYS[key]
    else:
        raise ConfigError(f"model.params: conditioning_key {key!r} is not supported ({sorted(_CONDITIONING_KEYS)})")

    prediction = params.get("parameterization", "eps")
    if prediction not in ("eps", "v", "x0"):
        raise ConfigError(f"model.params: parameterization must be 'eps', 'v' or 'x0', got {prediction!r}")
    noise_augmentation = max_noise_level = None
    low_scale = params.get("low_scale_config")
    if low_scale is not None:
        low_params = dict(low_scale.get("params") or {})
        kept = _split_params(low_params, {"noise_schedule_config", "max_noise_level"}, frozenset({"to_cuda"}), {},
                             "low_scale_config")
        noise_augmentation = _schedule(kept.get("noise_schedule_config") or {}, "low_scale_config")
        max_noise_level = int(kept.get("max_noise_level", 1000))

    from latent_diffusion.families import get_family

    name = get_family(family).with_prediction(prediction).name if family else "custom"
    return ModelSpec(
        family=name,
        unet=_unet_config(_section(params, "unet_config", "model.params")),
        autoencoder=_autoencoder_config(_section(params, "first_stage_config", "model.params")),
        conditioner=conditioner,
        conditioning=conditioning,
        prediction=prediction,
        schedule=_schedule(params, "model.params"),
        scale_factor=float(params.get("scale_factor", 1.0)),
        noise_augmentation=noise_augmentation,
        max_noise_level=max_noise_level,
    )
