"""Conversion between the original single-file layout and the diffusers folder layout, at the edge.

Inside the package every network keeps the original CompVis / Stable Diffusion key names; this
module is the only place that knows the diffusers names. A diffusers folder is::

    model_index.json  scheduler/scheduler_config.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}         (a transformers CLIPTextModel)

The renaming is built from our own model's keys (original name -> diffusers name) and inverted
for the other direction, so the two directions cannot drift apart and a round trip is lossless.
Tensors are only renamed, except where diffusers stores a different shape (the VAE attention's
1x1 convolutions become linear layers; OpenCLIP's fused q/k/v projection is split in three).

diffusers drops what Stable Diffusion 2 never uses from the OpenCLIP text tower (its last layer,
``text_projection``, ``logit_scale``). We keep those in ``text_encoder/openclip_extras.safetensors``
(ignored by diffusers and transformers) so our own round trip loses nothing; folders made by
diffusers lack them, and then the unused projection is filled with NaN, so that any use shows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from latent_diffusion.checkpoints.detect import COND_PREFIX, UNET_PREFIX, VAE_PREFIX, detect_family, shapes_of
from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict, save_safetensors
from latent_diffusion.checkpoints.load import LoadedModel, build_on_meta, load_state_dict_into_model
from latent_diffusion.config import (
    AutoencoderConfig, CLIPTextConfig, ModelSpec, ScheduleConfig, UNetConfig, preset,
)
from latent_diffusion.models.unet import transformer_heads

# Recorded in the config files we write; diffusers and transformers only compare it for warnings.
_WRITER_VERSION = "0.21.0"
_OPENCLIP_EXTRAS = "openclip_extras.safetensors"
_EXTRAS_ONLY = "<openclip extras>"
_PREDICTION_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_PIPELINES = {"sd2-x4-upscaler": "StableDiffusionUpscalePipeline",
              "sd1-inpaint": "StableDiffusionInpaintPipeline", "sd2-inpaint": "StableDiffusionInpaintPipeline"}


# ---------------------------------------------------------------------------------------------
# Key renaming, original -> diffusers (one rule per key; the inverse is the inverted dict)

_RESNET_PARTS = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_UNET_FIXED = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
               "label_emb.": "class_embedding.", "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.",
               "out.2.": "conv_out."}


def _replace_parts(rest: str, parts) -> str:
    for old, new in parts:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _unet_name(key: str, blocks_per_level: int) -> str:
    for old, new in _UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    found = re.match(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.*)", key)
    if found is None:
        raise CheckpointError(f"no diffusers name for UNet key {key!r}")
    group, index, sub, rest = found.group(1), int(found.group(2)), found.group(3), found.group(4)
    if group == "middle_block":
        rest = rest if sub is None else f"{sub}.{rest}"
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{index // 2}.{_replace_parts(rest, _RESNET_PARTS)}"
    sub = int(sub)
    if group == "input_blocks":
        level, slot = divmod(index - 1, blocks_per_level)
        if slot == blocks_per_level - 1:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        prefix = f"down_blocks.{level}"
    else:
        level, slot = divmod(index, blocks_per_level)
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        prefix = f"up_blocks.{level}"
    if sub == 0:
        return f"{prefix}.resnets.{slot}.{_replace_parts(rest, _RESNET_PARTS)}"
    return f"{prefix}.attentions.{slot}.{rest}"


_VAE_ATTENTION_PARTS = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                        ("proj_out.", "to_out.0."))


def _vae_name(key: str, levels: int) -> str:
    side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    if not side:
        return key  # quant_conv, post_quant_conv
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[len('norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    found = re.match(r"mid\.(block_1|block_2|attn_1)\.(.*)", rest)
    if found:
        part, leaf = found.groups()
        if part == "attn_1":
            return f"{side}.mid_block.attentions.0.{_replace_parts(leaf, _VAE_ATTENTION_PARTS)}"
        leaf = leaf.replace("nin_shortcut.", "conv_shortcut.")
        return f"{side}.mid_block.resnets.{0 if part == 'block_1' else 1}.{leaf}"
    found = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample|attn)\.(.*)", rest)
    if found is None or found.group(3) == "attn":
        raise CheckpointError(f"no diffusers name for autoencoder key {key!r} (diffusers has no per-level attention)")
    direction, level, part, block, leaf = found.groups()
    level = int(level) if direction == "down" else levels - 1 - int(level)  # diffusers counts decoder levels top-down
    stage = f"{side}.{direction}_blocks.{level}"
    if block is not None:
        return f"{stage}.resnets.{block}.{leaf.replace('nin_shortcut.', 'conv_shortcut.')}"
    return f"{stage}.{direction}samplers.0.{leaf}"


def _openai_clip_name(key: str) -> str:
    return key.removeprefix("transformer.")  # -> text_model.*


_OPENCLIP_LAYER_PARTS = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def _openclip_name(key: str) -> str:
    body = key.removeprefix("model.")
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias"}
    if body in fixed:
        return fixed[body]
    if body in ("text_projection", "logit_scale"):
        return _EXTRAS_ONLY  # CLIPTextModel has no place for them
    found = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", body)
    if found is None:
        raise CheckpointError(f"no diffusers name for OpenCLIP key {key!r}")
    layer, leaf = found.groups()
    if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return f"text_model.encoder.layers.{layer}.self_attn.{{q,k,v}}_proj.{leaf.rsplit('_', 1)[1]}"
    return f"text_model.encoder.layers.{layer}.{_replace_parts(leaf, _OPENCLIP_LAYER_PARTS)}"


def _component_names(spec: ModelSpec, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Original key -> (component folder, diffusers name) for every network key of ``spec``."""
    blocks_per_level = spec.unet.num_res_blocks + 1
    levels = len(spec.autoencoder.ch_mult)
    names: dict[str, tuple[str, str]] = {}
    for key in keys:
        if key.startswith(UNET_PREFIX):
            names[key] = ("unet", _unet_name(key[len(UNET_PREFIX):], blocks_per_level))
        elif key.startswith(VAE_PREFIX):
            names[key] = ("vae", _vae_name(key[len(VAE_PREFIX):], levels))
        elif key.startswith(COND_PREFIX):
            rest = key[len(COND_PREFIX):]
            names[key] = ("text_encoder", _openai_clip_name(rest) if rest.startswith("transformer.") else _openclip_name(rest))
    return names


def _check_supported(spec: ModelSpec) -> None:
    unet, vae = spec.unet, spec.autoencoder
    problems = []
    if not unet.use_spatial_transformer or unet.resblock_updown or not unet.conv_resample or unet.use_scale_shift_norm:
        problems.append("its UNet is not a UNet2DConditionModel")
    if unet.transformer_positions:
        problems.append("its transformers add grid positions, which diffusers' have no place for")
    if vae.kind != "kl" or vae.attn_resolutions or vae.attn_type != "vanilla" or vae.z_channels != vae.embed_dim:
        problems.append("its autoencoder is not a diffusers AutoencoderKL")
    if not isinstance(spec.conditioner, CLIPTextConfig):
        problems.append("its condition encoder is not CLIP")
    if problems:
        raise CheckpointError(f"the diffusers layout cannot hold a {spec.family!r} model: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------
# Configs, ours -> diffusers and back


def _unet_diffusers_config(spec: ModelSpec) -> dict[str, Any]:
    unet = spec.unet
    widths = [unet.model_channels * m for m in unet.channel_mult]
    attends = [2**level in unet.attention_resolutions for level in range(len(widths))]
    heads = [transformer_heads(unet, width)[0] for width in widths]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": _WRITER_VERSION,
        "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "block_out_channels": widths, "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": unet.context_dim, "attention_head_dim": heads,
        "transformer_layers_per_block": unet.transformer_depth,
        "use_linear_projection": unet.use_linear_in_transformer,
        "only_cross_attention": list(unet.disable_self_attentions) if unet.disable_self_attentions else False,
        "num_class_embeds": unet.num_classes, "class_embed_type": None,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "dual_cross_attention": False, "upcast_attention": False, "resnet_time_scale_shift": "default",
        "sample_size": 128 if spec.family == "sd2-x4-upscaler" else 64,
    }


def _unet_from_diffusers(config: dict[str, Any], base: UNetConfig) -> UNetConfig:
    widths = config["block_out_channels"]
    # diffusers' "attention_head_dim" is, despite its name, the number of heads per level.
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    head_widths = {w // h for w, h in zip(widths, heads)}
    if len(set(heads)) == 1:
        num_heads, num_head_channels = heads[0], -1
    elif len(head_widths) == 1 and all(w % h == 0 for w, h in zip(widths, heads)):
        num_heads, num_head_channels = -1, head_widths.pop()
    else:
        raise CheckpointError(f"unet/config.json: heads {heads} per level fit neither a fixed count nor a fixed width")
    only_cross = config.get("only_cross_attention", False)
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise CheckpointError("unet/config.json: per-level transformer depths are not supported")
        depth = depth[0]
    return dataclasses.replace(
        base, in_channels=config["in_channels"], out_channels=config["out_channels"],
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(2**i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t),
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=config["cross_attention_dim"], use_linear_in_transformer=config.get("use_linear_projection", False),
        transformer_depth=depth, num_classes=config.get("num_class_embeds"),
        disable_self_attentions=tuple(only_cross) if isinstance(only_cross, (list, tuple)) else (
            (True,) * len(widths) if only_cross else None),
    )


def _vae_diffusers_config(spec: ModelSpec) -> dict[str, Any]:
    vae = spec.autoencoder
    levels = len(vae.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": _WRITER_VERSION,
        "in_channels": vae.in_channels, "out_channels": vae.out_ch, "latent_channels": vae.z_channels,
        "block_out_channels": [vae.ch * m for m in vae.ch_mult], "layers_per_block": vae.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "act_fn": "silu", "norm_num_groups": vae.norm_groups, "sample_size": vae.resolution, "scaling_factor": spec.scale_factor,
    }


def _vae_from_diffusers(config: dict[str, Any], base: AutoencoderConfig) -> AutoencoderConfig:
    widths = config["block_out_channels"]
    return dataclasses.replace(
        base, kind="kl", in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3),
        z_channels=config["latent_channels"], embed_dim=config["latent_channels"], double_z=True,
        ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=config["layers_per_block"],
        attn_resolutions=(), attn_type="vanilla", norm_groups=config.get("norm_num_groups", 32),
    )


def _text_diffusers_config(text: CLIPTextConfig) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": 4 * text.width,
        "num_attention_heads": text.heads, "num_hidden_layers": text.layers - text.skip_last_layers,
        "max_position_embeddings": text.context_length, "hidden_act": text.activation, "layer_norm_eps": 1e-5,
        "projection_dim": text.width, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407 if text.pad_with_eos else 0, "torch_dtype": "float32",
    }


def _text_from_diffusers(config: dict[str, Any], base: CLIPTextConfig, stored_layers: int) -> CLIPTextConfig:
    return dataclasses.replace(
        base, vocab_size=config["vocab_size"], width=config["hidden_size"], heads=config["num_attention_heads"],
        layers=stored_layers, skip_last_layers=stored_layers - config["num_hidden_layers"],
        context_length=config["max_position_embeddings"], activation=config.get("hidden_act", base.activation),
    )


def _scheduler_config(spec: ModelSpec) -> dict[str, Any]:
    schedule = spec.schedule
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": _WRITER_VERSION,
        "num_train_timesteps": schedule.timesteps, "beta_start": schedule.linear_start, "beta_end": schedule.linear_end,
        "beta_schedule": {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule.kind],
        "prediction_type": _PREDICTION_NAMES[spec.prediction], "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "timestep_spacing": "leading",
    }


# ---------------------------------------------------------------------------------------------
# Tensors


def to_diffusers(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Original-layout network weights -> {"unet"|"vae"|"text_encoder"|"openclip_extras": diffusers-named tensors}."""
    _check_supported(spec)
    names = _component_names(spec, list(state_dict))
    text = spec.conditioner
    skipped_from = text.layers - text.skip_last_layers
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}, _OPENCLIP_EXTRAS: {}}
    for key, tensor in state_dict.items():
        if key not in names:
            raise CheckpointError(f"no diffusers place for {key!r}")
        component, name = names[key]
        if component == "text_encoder" and text.layout == "openclip":
            layer = re.match(r"text_model\.encoder\.layers\.(\d+)\.", name)
            if name == _EXTRAS_ONLY or (layer and int(layer.group(1)) >= skipped_from):
                out[_OPENCLIP_EXTRAS][key[len(COND_PREFIX):]] = tensor
                continue
            if "{q,k,v}" in name:
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                    out[component][name.replace("{q,k,v}", part)] = chunk
                continue
        if component == "vae" and ".mid_block.attentions.0." in name and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 convolution -> linear
        out[component][name] = tensor
    return out


def from_diffusers(spec: ModelSpec, components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers`: diffusers-named tensors -> original-layout network weights."""
    _check_supported(spec)
    expected = build_on_meta(spec).state_dict()
    names = _component_names(spec, list(expected))
    text = spec.conditioner
    out: dict[str, torch.Tensor] = {}
    used: dict[str, set[str]] = {c: set() for c in components}
    extras = components.get(_OPENCLIP_EXTRAS, {})
    for key, (component, name) in names.items():
        tensors = components[component]
        if "{q,k,v}" in name:
            parts = [name.replace("{q,k,v}", p) for p in "qkv"]
            if all(p in tensors for p in parts):
                out[key] = torch.cat([tensors[p] for p in parts], dim=0)
                used[component].update(parts)
                continue
        elif name in tensors:
            tensor = tensors[name]
            if tensor.dim() == 2 and expected[key].dim() == 4:
                tensor = tensor[:, :, None, None]  # linear -> 1x1 convolution
            out[key] = tensor
            used[component].add(name)
            continue
        original = key[len(COND_PREFIX):]
        if text.layout == "openclip" and original in extras:
            out[key] = extras[original]
            used[_OPENCLIP_EXTRAS].add(original)
    for component, tensors in components.items():
        unused = sorted(set(tensors) - used[component])
        if unused:
            raise CheckpointError(f"{component}: tensors with no place in a {spec.family!r} model: {unused[:10]} "
                                  f"({len(unused)} in all)")
    return out


# ---------------------------------------------------------------------------------------------
# Folders


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {path.parent.parent} a diffusers folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def _weights_file(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise CheckpointError(f"{folder}: no weights file ({' / '.join(stems)}.safetensors or .bin)")


def _strip_text_model_level(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; accept both."""
    return {(k if k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale") else f"text_model.{k}"): v
            for k, v in tensors.items()}


def load_diffusers_folder(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a diffusers Stable Diffusion folder (unet, vae, text_encoder, scheduler) into our layout."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder")
    unet_config = _read_json(root / "unet" / "config.json")
    vae_config = _read_json(root / "vae" / "config.json")
    text_config = _read_json(root / "text_encoder" / "config.json")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}

    components = {
        "unet": read_state_dict(_weights_file(root / "unet", ("diffusion_pytorch_model",))),
        "vae": read_state_dict(_weights_file(root / "vae", ("diffusion_pytorch_model",))),
        "text_encoder": _strip_text_model_level(read_state_dict(_weights_file(root / "text_encoder", ("model", "pytorch_model")))),
    }
    extras_path = root / "text_encoder" / _OPENCLIP_EXTRAS
    components[_OPENCLIP_EXTRAS] = read_state_dict(extras_path) if extras_path.is_file() else {}

    # The OpenCLIP layout is what SD 2 files use; the activation tells the two text towers apart.
    base = preset("sd2" if text_config.get("hidden_act") == "gelu" else "sd1")
    stored_layers = text_config["num_hidden_layers"] + sum(
        1 for k in components[_OPENCLIP_EXTRAS] if re.fullmatch(r"model\.transformer\.resblocks\.\d+\.ln_1\.weight", k))
    provisional = dataclasses.replace(
        base,
        unet=_unet_from_diffusers(unet_config, base.unet),
        autoencoder=_vae_from_diffusers(vae_config, base.autoencoder),
        conditioner=_text_from_diffusers(text_config, base.conditioner, stored_layers),
    )
    prediction = {v: k for k, v in _PREDICTION_NAMES.items()}.get(scheduler.get("prediction_type", "epsilon"), "eps")
    family = detect_family(shapes_of(build_on_meta(provisional).state_dict())).family
    family_spec = preset("sd2-v" if (family, prediction) == ("sd2", "v") else family)
    spec = dataclasses.replace(
        family_spec, unet=provisional.unet, autoencoder=provisional.autoencoder, conditioner=provisional.conditioner,
        prediction=prediction, scale_factor=float(vae_config.get("scaling_factor", family_spec.scale_factor)),
        schedule=_schedule_from_scheduler(scheduler, family_spec.schedule),
    )

    filled = []
    if spec.conditioner.layout == "openclip":
        for name, shape in (("model.text_projection", (spec.conditioner.width,) * 2), ("model.logit_scale", ())):
            if name not in components[_OPENCLIP_EXTRAS]:
                components[_OPENCLIP_EXTRAS][name] = torch.full(shape, float("nan"))
                filled.append(COND_PREFIX + name)
    state_dict = from_diffusers(spec, components)
    loaded = load_state_dict_into_model(state_dict, source=root, family=spec.family, spec=spec, dtype=dtype, device=device)
    if filled:
        loaded.set_aside["absent from the diffusers folder; filled with NaN (Stable Diffusion never uses them)"] = filled
    return loaded


def _schedule_from_scheduler(config: dict[str, Any], default: ScheduleConfig) -> ScheduleConfig:
    if not config:
        return default
    kinds = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    kind = config.get("beta_schedule", "scaled_linear")
    if kind not in kinds:
        raise CheckpointError(f"scheduler_config.json: beta_schedule {kind!r} is not supported ({sorted(kinds)})")
    return ScheduleConfig(kind=kinds[kind], timesteps=int(config.get("num_train_timesteps", default.timesteps)),
                          linear_start=float(config.get("beta_start", default.linear_start)),
                          linear_end=float(config.get("beta_end", default.linear_end)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


def save_diffusers_folder(loaded: LoadedModel, path: str | os.PathLike) -> Path:
    """Write ``loaded`` as a diffusers folder (safetensors weights, configs, model_index.json)."""
    root = Path(path)
    spec = loaded.spec
    tensors = to_diffusers(spec, loaded.model.state_dict())
    metadata = {"format": "pt"}
    save_safetensors(tensors["unet"], root / "unet" / "diffusion_pytorch_model.safetensors", metadata)
    _write_json(root / "unet" / "config.json", _unet_diffusers_config(spec))
    save_safetensors(tensors["vae"], root / "vae" / "diffusion_pytorch_model.safetensors", metadata)
    _write_json(root / "vae" / "config.json", _vae_diffusers_config(spec))
    save_safetensors(tensors["text_encoder"], root / "text_encoder" / "model.safetensors", metadata)
    _write_json(root / "text_encoder" / "config.json", _text_diffusers_config(spec.conditioner))
    if tensors[_OPENCLIP_EXTRAS]:
        save_safetensors(tensors[_OPENCLIP_EXTRAS], root / "text_encoder" / _OPENCLIP_EXTRAS, metadata)
    _write_json(root / "scheduler" / "scheduler_config.json", _scheduler_config(spec))
    index = {
        "_class_name": _PIPELINES.get(spec.family, "StableDiffusionPipeline"), "_diffusers_version": _WRITER_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if spec.family == "sd2-x4-upscaler":
        index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], max_noise_level=spec.max_noise_level)
    _write_json(root / "model_index.json", index)
    return root


def save_single_file(loaded: LoadedModel, path: str | os.PathLike, *, include_schedule: bool = True) -> Path:
    """Write ``loaded`` as an original-layout ``.safetensors`` (atomically), with the schedule buffers."""
    tensors = dict(loaded.model.state_dict())
    if include_schedule and loaded.training_schedule is not None:
        tensors["betas"] = loaded.training_schedule.betas.float()
        tensors["alphas_cumprod"] = loaded.training_schedule.alphas_cumprod.float()
    metadata = {"format": "pt", "ldm.family": loaded.spec.family, "ldm.prediction": loaded.spec.prediction}
    save_safetensors(tensors, path, metadata)
    return Path(path)
