"""Original (CompVis / Stability) key names -> diffusers / transformers names, one rule per key.

Inside the package every network keeps the original names; this module and the folder converter
are the only places that know the diffusers names. Each rule maps one original key; the converter
builds the map from our own model's keys and inverts it for the other direction, so the two
directions cannot drift apart.
"""
from __future__ import annotations

import re

from latent_diffusion.checkpoints.io import CheckpointError

# OpenCLIP tensors a transformers text model has no place for (kept beside it by the converter).
EXTRAS_ONLY = "<openclip extras>"

_RESNET_PARTS = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_UNET_FIXED = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
               "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
               "label_emb.": "class_embedding.", "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.",
               "out.2.": "conv_out."}


def _replace_parts(rest: str, parts) -> str:
    for old, new in parts:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def unet_name(key: str, blocks_per_level: int) -> str:
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


def vae_name(key: str, levels: int) -> str:
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


def openai_clip_name(key: str) -> str:
    return key.removeprefix("transformer.")  # -> text_model.*


_OPENCLIP_LAYER_PARTS = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def openclip_name(key: str, with_projection: bool = False) -> str:
    """``with_projection``: the target is a ``CLIPTextModelWithProjection`` (SDXL's bigG), which
    keeps the projection as a linear layer (transposed); a ``CLIPTextModel`` has no place for it."""
    body = key.removeprefix("model.")
    if body == "text_projection" and with_projection:
        return "text_projection.weight"
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias"}
    if body in fixed:
        return fixed[body]
    if body in ("text_projection", "logit_scale"):
        return EXTRAS_ONLY  # CLIPTextModel has no place for them
    found = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", body)
    if found is None:
        raise CheckpointError(f"no diffusers name for OpenCLIP key {key!r}")
    layer, leaf = found.groups()
    if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return f"text_model.encoder.layers.{layer}.self_attn.{{q,k,v}}_proj.{leaf.rsplit('_', 1)[1]}"
    return f"text_model.encoder.layers.{layer}.{_replace_parts(leaf, _OPENCLIP_LAYER_PARTS)}"


def controlnet_name(key: str, blocks_per_level: int, hint_convolutions: int) -> str:
    """A ControlNet's key (without ``control_model.``) -> its diffusers ``ControlNetModel`` name; the
    encoder copy is named as the UNet's encoder. ``hint_convolutions``: the hint encoder's count."""
    found = re.match(r"zero_convs\.(\d+)\.0\.(.*)", key)
    if found:
        return f"controlnet_down_blocks.{found.group(1)}.{found.group(2)}"
    if key.startswith("middle_block_out.0."):
        return "controlnet_mid_block." + key[len("middle_block_out.0."):]
    found = re.match(r"input_hint_block\.(\d+)\.(.*)", key)
    if found:
        # The release numbers the convolutions 0, 2, 4, ... (SiLUs between); diffusers has conv_in,
        # blocks.0 ... and conv_out.
        index, leaf = int(found.group(1)) // 2, found.group(2)
        if index == 0:
            return f"controlnet_cond_embedding.conv_in.{leaf}"
        if index == hint_convolutions - 1:
            return f"controlnet_cond_embedding.conv_out.{leaf}"
        return f"controlnet_cond_embedding.blocks.{index - 1}.{leaf}"
    return unet_name(key, blocks_per_level)
