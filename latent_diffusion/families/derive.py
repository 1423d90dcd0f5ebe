"""Network configs from tensor shapes: every size a state dict determines, the rest from a preset.

A model with non-standard widths or depths (a fine-tune, a pruned or a tiny test model) loads too;
only what no shape reveals (attention head counts, the prediction target) comes from the family's
preset, passed in as ``base``.
"""
from __future__ import annotations

import dataclasses
import re

from latent_diffusion.config import AutoencoderConfig, BERTTextConfig, ClassEmbedderConfig, CLIPTextConfig, UNetConfig
from latent_diffusion.families.features import Shapes


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers N in keys ``prefix + "N."...``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


@dataclasses.dataclass
class _Attention:
    """What the transformers of one UNet level show in their shapes."""

    depth: int
    linear_proj: bool
    context_dim: int
    self_attention_disabled: bool | None  # None: the shapes cannot tell


def _level_attention(shapes: Shapes, block: str, channels: int) -> _Attention:
    context_dim = shapes[f"{block}transformer_blocks.0.attn2.to_k.weight"][1]
    self_key_width = shapes[f"{block}transformer_blocks.0.attn1.to_k.weight"][1]
    # A disabled self-attention attends to the context instead; only visible when widths differ.
    disabled = True if self_key_width != channels else (False if context_dim != channels else None)
    return _Attention(
        depth=len(_indices(shapes, f"{block}transformer_blocks.")),
        linear_proj=len(shapes[f"{block}proj_in.weight"]) == 2,
        context_dim=context_dim, self_attention_disabled=disabled,
    )


def _depths(per_level: list[int], middle: int | None, base: UNetConfig) -> tuple[int | tuple[int, ...], int | None]:
    """(transformer_depth, transformer_depth_middle): one number when every transformer has the same depth."""
    used = [d for d in per_level if d] + ([middle] if middle else [])
    if not used:
        return base.transformer_depth, base.transformer_depth_middle
    if len(set(used)) == 1:
        return used[0], None
    return tuple(per_level), middle


def derive_unet_config(shapes: Shapes, base: UNetConfig, prefix: str) -> UNetConfig:
    """The UNet config whose modules have exactly these shapes; head counts and ``legacy`` come from ``base``."""
    output_blocks = _indices(shapes, f"{prefix}output_blocks.")

    def upsamples(i: int) -> bool:
        return any(
            f"{prefix}output_blocks.{i}.{j}.{leaf}" in shapes
            for j in (1, 2) for leaf in ("conv.weight", "in_layers.0.weight")
        )

    ups = [i for i in output_blocks if upsamples(i)]
    blocks_per_level = ups[0] + 1 if ups else len(output_blocks)
    levels = len(output_blocks) // blocks_per_level
    resblock_updown = any(
        f"{prefix}output_blocks.{i}.{j}.in_layers.0.weight" in shapes for i in ups for j in (1, 2)
    )
    return dataclasses.replace(
        _derive_encoder(shapes, base, prefix, levels, blocks_per_level),
        out_channels=shapes[f"{prefix}out.2.weight"][0], resblock_updown=resblock_updown,
    )


def derive_unet_encoder_config(shapes: Shapes, base: UNetConfig, prefix: str) -> UNetConfig:
    """The config of a UNet whose input and middle blocks have these shapes (a ControlNet's copy of
    them: no output blocks). Output channels are taken to be the input's."""
    input_blocks = _indices(shapes, f"{prefix}input_blocks.")
    # Each level but the last ends in a downsampling convolution (released ControlNets have no
    # ResBlock downsampling, which the keys could not tell from an ordinary ResBlock).
    levels = 1 + sum(f"{prefix}input_blocks.{i}.0.op.weight" in shapes for i in input_blocks)
    if len(input_blocks) % levels:
        raise KeyError(f"{len(input_blocks)} input blocks do not split into {levels} levels")
    config = _derive_encoder(shapes, base, prefix, levels, len(input_blocks) // levels)
    return dataclasses.replace(config, out_channels=config.in_channels, resblock_updown=False)


def _derive_encoder(shapes: Shapes, base: UNetConfig, prefix: str, levels: int, blocks_per_level: int) -> UNetConfig:
    """Every size the input and middle blocks show, for ``levels`` levels of ``blocks_per_level``
    blocks (the ResBlocks and the level's downsampling or upsampling block)."""
    first = shapes[f"{prefix}input_blocks.0.0.weight"]
    model_channels, in_channels, dims = first[0], first[1], len(first) - 2
    channel_mult, attention_resolutions, depths, disabled_flags, seen = [], [], [], [], []
    spatial_transformer = False
    for level in range(levels):
        block = f"{prefix}input_blocks.{1 + level * blocks_per_level}."
        channels = shapes[f"{block}0.out_layers.3.weight"][0]
        channel_mult.append(channels // model_channels)
        attention = None
        if _has_prefix(shapes, f"{block}1."):
            attention_resolutions.append(2**level)
            if _has_prefix(shapes, f"{block}1.transformer_blocks."):
                spatial_transformer = True
                attention = _level_attention(shapes, f"{block}1.", channels)
                seen.append(attention)
        depths.append(attention.depth if attention else 0)
        disabled_flags.append(attention.self_attention_disabled if attention else None)

    disable_self_attentions = None
    if any(disabled_flags):
        preset_flags = base.disable_self_attentions or ()
        disable_self_attentions = tuple(
            flag if flag is not None else (preset_flags[i] if i < len(preset_flags) else False)
            for i, flag in enumerate(disabled_flags)
        )
    middle = f"{prefix}middle_block.1."
    middle_depth = len(_indices(shapes, f"{middle}transformer_blocks.")) or None
    disable_middle = False
    if f"{middle}transformer_blocks.0.attn1.to_k.weight" in shapes:
        disable_middle = shapes[f"{middle}transformer_blocks.0.attn1.to_k.weight"][1] != model_channels * channel_mult[-1]
    transformer_depth, depth_middle = _depths(depths, middle_depth, base)

    emb_out = shapes[f"{prefix}input_blocks.1.0.emb_layers.1.weight"][0]
    label = shapes.get(f"{prefix}label_emb.weight")
    adm = shapes.get(f"{prefix}label_emb.0.0.weight")
    return dataclasses.replace(
        base,
        in_channels=in_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=blocks_per_level - 1,
        attention_resolutions=tuple(attention_resolutions),
        use_spatial_transformer=spatial_transformer,
        transformer_depth=transformer_depth, transformer_depth_middle=depth_middle,
        context_dim=seen[0].context_dim if seen else None,
        use_linear_in_transformer=seen[0].linear_proj if seen else base.use_linear_in_transformer,
        num_classes="sequential" if adm else (label[0] if label else None),
        adm_in_channels=adm[1] if adm else None,
        disable_self_attentions=disable_self_attentions,
        disable_middle_self_attn=disable_middle,
        use_scale_shift_norm=emb_out == 2 * model_channels * channel_mult[0],
        dims=dims,
    )


def derive_autoencoder_config(shapes: Shapes, base: AutoencoderConfig, prefix: str) -> AutoencoderConfig:
    """The autoencoder config with these shapes; ``resolution`` (which places attention) comes from ``base``."""
    conv_in = shapes[f"{prefix}encoder.conv_in.weight"]
    ch, in_channels = conv_in[0], conv_in[1]
    levels = _indices(shapes, f"{prefix}encoder.down.")
    ch_mult = tuple(shapes[f"{prefix}encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
    num_res_blocks = len(_indices(shapes, f"{prefix}encoder.down.0.block."))
    attn_resolutions = tuple(
        base.resolution // 2**i for i in levels if _has_prefix(shapes, f"{prefix}encoder.down.{i}.attn.")
    )
    z_channels = shapes[f"{prefix}decoder.conv_in.weight"][1]
    codebook = shapes.get(f"{prefix}quantize.embedding.weight")
    return dataclasses.replace(
        base,
        kind="vq" if codebook else "kl",
        embed_dim=shapes[f"{prefix}post_quant_conv.weight"][1],
        z_channels=z_channels,
        double_z=shapes[f"{prefix}encoder.conv_out.weight"][0] == 2 * z_channels,
        in_channels=in_channels,
        out_ch=shapes[f"{prefix}decoder.conv_out.weight"][0],
        ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
        attn_type="vanilla" if f"{prefix}encoder.mid.attn_1.q.weight" in shapes else "none",
        n_embed=codebook[0] if codebook else 0,
    )


# OpenAI and OpenCLIP text towers all use 64-wide attention heads (ViT-L 768/12, ViT-H 1024/16, bigG 1280/20).
_CLIP_HEAD_WIDTH = 64


def _clip_heads(width: int, base: CLIPTextConfig) -> int:
    if width % _CLIP_HEAD_WIDTH == 0:
        return width // _CLIP_HEAD_WIDTH
    return base.heads if width % base.heads == 0 else 1


def derive_clip_config(shapes: Shapes, base: CLIPTextConfig, prefix: str) -> CLIPTextConfig:
    """The CLIP text tower under ``prefix`` (``base`` supplies layout, activation and which layer is read)."""
    if base.layout == "openai":
        body = f"{prefix}transformer.text_model."
        tokens = shapes[f"{body}embeddings.token_embedding.weight"]
        positions = shapes[f"{body}embeddings.position_embedding.weight"]
        layers = len(_indices(shapes, f"{body}encoder.layers."))
    else:
        body = f"{prefix}model."
        tokens = shapes[f"{body}token_embedding.weight"]
        positions = shapes[f"{body}positional_embedding"]
        layers = len(_indices(shapes, f"{body}transformer.resblocks."))
    # The family fixes how many layers produce the context; SD 2 files converted from diffusers
    # already lack the skipped last layer (diffusers drops it), so nothing is skipped then.
    used = base.layers - base.skip_last_layers
    skip = 0 if layers == used else min(base.skip_last_layers, layers - 1)
    return dataclasses.replace(
        base, vocab_size=tokens[0], width=tokens[1], context_length=positions[0], layers=layers,
        heads=_clip_heads(tokens[1], base), skip_last_layers=skip,
    )


def derive_bert_config(shapes: Shapes, base: BERTTextConfig, prefix: str) -> BERTTextConfig:
    body = f"{prefix}transformer."
    tokens = shapes[f"{body}token_emb.weight"]
    inner = shapes[f"{body}attn_layers.layers.0.1.to_q.weight"][0]
    hidden = shapes[f"{body}attn_layers.layers.1.1.net.0.0.weight"][0]
    return dataclasses.replace(
        base, vocab_size=tokens[0], n_embed=tokens[1], max_seq_len=shapes[f"{body}pos_emb.emb.weight"][0],
        n_layer=len(_indices(shapes, f"{body}attn_layers.layers.")) // 2,
        dim_head=inner // base.heads, ff_mult=hidden // tokens[1],
    )


def derive_class_embedder_config(shapes: Shapes, prefix: str) -> ClassEmbedderConfig:
    n_classes, embed_dim = shapes[f"{prefix}embedding.weight"]
    return ClassEmbedderConfig(n_classes=n_classes, embed_dim=embed_dim)
