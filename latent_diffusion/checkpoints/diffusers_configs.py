"""The ``config.json`` files of a diffusers folder, written from our configs and read back into them."""
from __future__ import annotations

import dataclasses
from typing import Any

from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.config import AutoencoderConfig, CLIPTextConfig, ModelSpec, ScheduleConfig, UNetConfig
from latent_diffusion.models.unet import transformer_heads

# Recorded in the config files we write; diffusers and transformers only compare it for warnings.
WRITER_VERSION = "0.21.0"
PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def keeps_every_layer(text: CLIPTextConfig) -> bool:
    """Whether diffusers keeps the layers our config skips. SD 2 reads the penultimate layer through
    the final LayerNorm, which is a CLIPTextModel without its last layer, so diffusers drops that
    layer; SDXL reads ``hidden_states[-2]`` and needs the last layer for the pooled output."""
    return not text.normalize_context


def with_projection(text: CLIPTextConfig) -> bool:
    """SDXL's bigG is a ``CLIPTextModelWithProjection`` (its projected pooled output conditions the UNet)."""
    return text.layout == "openclip" and not text.normalize_context


def unet_config(spec: ModelSpec, sample_size: int | None = None) -> dict[str, Any]:
    """``sample_size``: the latent side diffusers records; by default the family's native size."""
    if sample_size is None:
        from latent_diffusion.families import family_of

        sample_size = family_of(spec).diffusers_sample_size(spec)
    unet = spec.unet
    widths = [unet.model_channels * m for m in unet.channel_mult]
    attends = [2**level in unet.attention_resolutions for level in range(len(widths))]
    # Levels without attention still state a head count; any that divides them does.
    heads = [transformer_heads(unet, width)[0] if attends[level] or unet.num_head_channels == -1
             or width >= unet.num_head_channels else 1 for level, width in enumerate(widths)]
    depths = [unet.depth_at(level) or 1 for level in range(len(widths))]
    config = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": WRITER_VERSION,
        "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "block_out_channels": widths, "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": unet.context_dim, "attention_head_dim": heads,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
        "use_linear_projection": unet.use_linear_in_transformer,
        "only_cross_attention": list(unet.disable_self_attentions) if unet.disable_self_attentions else False,
        "num_class_embeds": None if unet.num_classes == "sequential" else unet.num_classes, "class_embed_type": None,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "dual_cross_attention": False, "upcast_attention": False, "resnet_time_scale_shift": "default",
        "sample_size": sample_size,
    }
    if unet.num_classes == "sequential":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=spec.conditioner.fourier_dim,
                      projection_class_embeddings_input_dim=unet.adm_in_channels)
    return config


def check_unet_fits(unet: UNetConfig) -> list[str]:
    """What of this UNet a diffusers UNet2DConditionModel cannot hold, in words."""
    problems = []
    if not unet.use_spatial_transformer or unet.resblock_updown or not unet.conv_resample or unet.use_scale_shift_norm:
        problems.append("its UNet is not a UNet2DConditionModel")
    if unet.transformer_positions:
        problems.append("its transformers add grid positions, which diffusers' have no place for")
    if unet.depth_at(None) != unet.depth_at(len(unet.channel_mult) - 1) and unet.depth_at(len(unet.channel_mult) - 1):
        problems.append("its middle block's transformer depth differs from the last level's")
    return problems


def _head_settings(widths: list[int], heads: list[int]) -> tuple[int, int]:
    """(num_heads, num_head_channels): a fixed count, or a fixed width when the count varies."""
    head_widths = {w // h for w, h in zip(widths, heads)}
    if len(set(heads)) == 1:
        return heads[0], -1
    if len(head_widths) == 1 and all(w % h == 0 for w, h in zip(widths, heads)):
        return -1, head_widths.pop()
    raise CheckpointError(f"unet/config.json: heads {heads} per level fit neither a fixed count nor a fixed width")


def unet_from_config(config: dict[str, Any], base: UNetConfig) -> UNetConfig:
    widths = config["block_out_channels"]
    # diffusers' "attention_head_dim" is, despite its name, the number of heads per level.
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    # Only levels with attention (and the middle block, which takes the last level's) use theirs.
    used = [i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t] + [len(widths) - 1]
    num_heads, num_head_channels = _head_settings([widths[i] for i in used], [heads[i] for i in used])
    only_cross = config.get("only_cross_attention", False)
    depth = config.get("transformer_layers_per_block", 1)
    depth = tuple(depth) if isinstance(depth, (list, tuple)) else depth
    adm = config.get("projection_class_embeddings_input_dim") if config.get("addition_embed_type") == "text_time" else None
    return dataclasses.replace(
        base, in_channels=config["in_channels"], out_channels=config["out_channels"],
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(2**i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t),
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=config["cross_attention_dim"], use_linear_in_transformer=config.get("use_linear_projection", False),
        transformer_depth=depth, transformer_depth_middle=None,
        num_classes="sequential" if adm else config.get("num_class_embeds"), adm_in_channels=adm,
        disable_self_attentions=tuple(only_cross) if isinstance(only_cross, (list, tuple)) else (
            (True,) * len(widths) if only_cross else None),
    )


def vae_config(spec: ModelSpec) -> dict[str, Any]:
    vae = spec.autoencoder
    levels = len(vae.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": WRITER_VERSION,
        "in_channels": vae.in_channels, "out_channels": vae.out_ch, "latent_channels": vae.z_channels,
        "block_out_channels": [vae.ch * m for m in vae.ch_mult], "layers_per_block": vae.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu", "norm_num_groups": vae.norm_groups, "sample_size": vae.resolution,
        "scaling_factor": spec.scale_factor,
    }


def check_vae_fits(vae: AutoencoderConfig) -> list[str]:
    if vae.kind != "kl" or vae.attn_resolutions or vae.attn_type != "vanilla" or vae.z_channels != vae.embed_dim:
        return ["its autoencoder is not a diffusers AutoencoderKL"]
    return []


def vae_from_config(config: dict[str, Any], base: AutoencoderConfig) -> AutoencoderConfig:
    widths = config["block_out_channels"]
    return dataclasses.replace(
        base, kind="kl", in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3),
        z_channels=config["latent_channels"], embed_dim=config["latent_channels"], double_z=True,
        ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=config["layers_per_block"],
        attn_resolutions=(), attn_type="vanilla", norm_groups=config.get("norm_num_groups", 32),
    )


def text_config(text: CLIPTextConfig) -> dict[str, Any]:
    projection = with_projection(text)
    layers = text.layers if keeps_every_layer(text) else text.layers - text.skip_last_layers
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": 4 * text.width,
        "num_attention_heads": text.heads, "num_hidden_layers": layers,
        "max_position_embeddings": text.context_length, "hidden_act": text.activation, "layer_norm_eps": 1e-5,
        "projection_dim": text.width, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407 if text.pad_with_eos else 0, "torch_dtype": "float32",
    }


def text_from_config(config: dict[str, Any], base: CLIPTextConfig, stored_layers: int) -> CLIPTextConfig:
    """``stored_layers``: the layers diffusers keeps plus any our own extras file holds (SD 2's last)."""
    skip = base.skip_last_layers if keeps_every_layer(base) else stored_layers - config["num_hidden_layers"]
    return dataclasses.replace(
        base, vocab_size=config["vocab_size"], width=config["hidden_size"], heads=config["num_attention_heads"],
        layers=stored_layers, skip_last_layers=skip,
        context_length=config["max_position_embeddings"], activation=config.get("hidden_act", base.activation),
    )


def scheduler_config(spec: ModelSpec) -> dict[str, Any]:
    schedule = spec.schedule
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": WRITER_VERSION,
        "num_train_timesteps": schedule.timesteps, "beta_start": schedule.linear_start, "beta_end": schedule.linear_end,
        "beta_schedule": {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule.kind],
        "prediction_type": PREDICTION_NAMES[spec.prediction], "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "timestep_spacing": "leading",
    }


def schedule_from_config(config: dict[str, Any], default: ScheduleConfig) -> ScheduleConfig:
    if not config:
        return default
    kinds = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    kind = config.get("beta_schedule", "scaled_linear")
    if kind not in kinds:
        raise CheckpointError(f"scheduler_config.json: beta_schedule {kind!r} is not supported ({sorted(kinds)})")
    return ScheduleConfig(kind=kinds[kind], timesteps=int(config.get("num_train_timesteps", default.timesteps)),
                          linear_start=float(config.get("beta_start", default.linear_start)),
                          linear_end=float(config.get("beta_end", default.linear_end)))
