"""ControlNets in diffusers' names: a ``ControlNetModel`` folder, or its weights alone in one file.

A folder's ``config.json`` states the architecture; for a lone file (as SDXL ControlNets are often
shared for A1111) the same config is read from the tensor shapes, the head layout from the family
(as for the original layout). Names are mapped by inverting the original-to-diffusers map built
from the model's own keys (``diffusers_names.controlnet_name``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from latent_diffusion.checkpoints.controlnet import build_on_meta, head_layout
from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict
from latent_diffusion.config import ConfigError
from latent_diffusion.models.controlnet import HINT_WIDTHS, ControlNetConfig

_HINT = "controlnet_cond_embedding."


def config_from_values(values: Mapping[str, Any], where: str) -> ControlNetConfig:
    """Our config from a diffusers ControlNetModel config (``config.json``'s values)."""
    from latent_diffusion.checkpoints import diffusers_configs as configs

    adm = values.get("addition_embed_type") == "text_time"
    base = head_layout(adm, bool(values.get("use_linear_projection")))
    try:
        unet = configs.unet_from_config({**values, "out_channels": values["in_channels"]}, base)
        return ControlNetConfig(unet, hint_channels=values.get("conditioning_channels", 3),
                                hint_widths=tuple(values.get("conditioning_embedding_out_channels", HINT_WIDTHS)),
                                global_average_pooling=bool(values.get("global_pool_conditions", False)))
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{where}: not a ControlNetModel config we can read ({error})") from None


def to_original(config: ControlNetConfig, tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors renamed to the original layout (every one must have a place)."""
    from latent_diffusion.checkpoints.diffusers_names import controlnet_name

    names = {controlnet_name(key, config.unet.num_res_blocks + 1, 2 * len(config.hint_widths)): key
             for key in build_on_meta(config).state_dict()}
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise CheckpointError(f"{where}: tensors with no place in the ControlNet its config describes: "
                              f"{unknown[:10]} ({len(unknown)} in all)")
    return {names[name]: tensor for name, tensor in tensors.items()}


def diffusers_folder(root: Path) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """Config and original-layout weights of a diffusers ControlNetModel folder."""
    from latent_diffusion.checkpoints.convert import _read_json, _weights_file

    values = _read_json(root / "config.json")
    if values.get("_class_name") != "ControlNetModel":
        raise CheckpointError(f"{root}: config.json describes a {values.get('_class_name')!r}, not a ControlNetModel")
    config = config_from_values(values, f"{root}/config.json")
    return config, to_original(config, read_state_dict(_weights_file(root, ("diffusion_pytorch_model",))), str(root))


def _indices(shapes: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in shapes if (m := pattern.match(key))})


def values_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers config a ControlNetModel with these tensor shapes has (heads: see ``head_layout``)."""
    levels = _indices(shapes, "down_blocks.")
    widths = [shapes[f"down_blocks.{level}.resnets.0.conv1.weight"][0] for level in levels]
    attends = [f"down_blocks.{level}.attentions.0.proj_in.weight" in shapes for level in levels]
    depths = [len(_indices(shapes, f"down_blocks.{level}.attentions.0.transformer_blocks.")) or 1 for level in levels]
    to_k = next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    linear = len(next(v for k, v in shapes.items() if k.endswith("proj_in.weight"))) == 2
    adm = shapes.get("add_embedding.linear_1.weight")
    hint_blocks = _indices(shapes, f"{_HINT}blocks.")
    values = dict(
        in_channels=shapes["conv_in.weight"][1], block_out_channels=widths,
        layers_per_block=len(_indices(shapes, "down_blocks.0.resnets.")),
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths, cross_attention_dim=to_k[1], use_linear_projection=linear,
        # No shape shows the head count: SD 1.x has eight per level, SD 2.x and SDXL 64-wide heads.
        attention_head_dim=[w // 64 for w in widths] if linear else 8,
        conditioning_channels=shapes[f"{_HINT}conv_in.weight"][1],
        conditioning_embedding_out_channels=[shapes[f"{_HINT}conv_in.weight"][0]]
        + [shapes[f"{_HINT}blocks.{i}.weight"][0] for i in hint_blocks[1::2]],
    )
    if adm is not None:
        values.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm[1])
    return values


def diffusers_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """Config and original-layout weights of a ControlNetModel's weights saved alone (diffusers' names)."""
    if "mid_block.attentions.0.proj_in.weight" not in tensors:
        raise CheckpointError(f"{path}: a diffusers ControlNet whose middle block has no attention; this "
                              "package's ControlNets (as the released ones) have it")
    try:
        values = values_from_shapes({k: tuple(v.shape) for k, v in tensors.items()})
    except (KeyError, StopIteration, IndexError) as error:
        raise CheckpointError(f"{path}: a ControlNet in diffusers' names, but a tensor its architecture needs is "
                              f"missing or malformed: {error}") from None
    config = config_from_values(values, str(path))
    return config, to_original(config, tensors, str(path))
