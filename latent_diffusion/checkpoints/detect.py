"""Which model family a state dict holds, and the exact shapes of its networks.

Families are told apart by the keys and shapes the file holds, never by its name. Detection works in
two steps, as ComfyUI's ``model_detection``: :func:`read_features` reduces the state dict to a few
facts (which text encoder, UNet input/output channels, VQ or KL first stage, ...), and each entry
of :data:`VARIANTS` says which facts its family needs. Exactly one entry must match. Then
:func:`derive_spec` starts from the family's preset and replaces every size that the tensors'
shapes determine, so a model with non-standard widths or depths loads too; only what no shape
reveals (attention head counts, the prediction target) comes from the preset.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from latent_diffusion.config import (
    AutoencoderConfig, BERTTextConfig, ClassEmbedderConfig, CLIPTextConfig, ConditionerConfig, ModelSpec,
    UNetConfig, preset,
)
from latent_diffusion.checkpoints.io import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape for anything with a ``.shape`` (tensors, :class:`~.io.TensorInfo`) or a plain shape."""
    return {k: tuple(getattr(v, "shape", v)) for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# Facts that tell families apart


@dataclass(frozen=True)
class Features:
    """What a state dict reveals about its architecture, in the terms the registry matches on."""

    condition_encoder: str | None  # "clip-openai", "openclip", "bert", "class", "first-stage", None
    first_stage: str | None  # "kl", "vq", None
    unet_in_channels: int | None
    unet_out_channels: int | None
    # Channels concatenated to the noisy latent (mask, masked image, low-resolution image).
    concat_channels: int | None
    cross_attention: bool
    label_embedding: bool
    first_stage_mid_attention: bool
    low_scale_buffers: bool


def _condition_encoder_kind(shapes: Shapes) -> str | None:
    if f"{COND_PREFIX}transformer.text_model.embeddings.token_embedding.weight" in shapes:
        return "clip-openai"
    if f"{COND_PREFIX}model.token_embedding.weight" in shapes:
        return "openclip"
    if f"{COND_PREFIX}transformer.token_emb.weight" in shapes:
        return "bert"
    if f"{COND_PREFIX}embedding.weight" in shapes:
        return "class"
    if f"{COND_PREFIX}encoder.conv_in.weight" in shapes:
        return "first-stage"  # CompVis "__is_first_stage__": the autoencoder stored a second time
    if any(k.startswith(COND_PREFIX) for k in shapes):
        return "unknown"
    return None


def read_features(state_dict: Mapping[str, Any]) -> Features:
    """Reduce a state dict (tensors or shapes) to the facts the family registry matches on."""
    shapes = shapes_of(state_dict)
    conv_in = shapes.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    conv_out = shapes.get(f"{UNET_PREFIX}out.2.weight")
    unet_in = conv_in[1] if conv_in else None
    unet_out = conv_out[0] if conv_out else None
    if f"{VAE_PREFIX}quantize.embedding.weight" in shapes:
        first_stage = "vq"
    elif f"{VAE_PREFIX}quant_conv.weight" in shapes or f"{VAE_PREFIX}decoder.conv_in.weight" in shapes:
        first_stage = "kl"
    else:
        first_stage = None
    return Features(
        condition_encoder=_condition_encoder_kind(shapes),
        first_stage=first_stage,
        unet_in_channels=unet_in,
        unet_out_channels=unet_out,
        concat_channels=unet_in - unet_out if unet_in is not None and unet_out is not None else None,
        cross_attention=any(k.startswith(UNET_PREFIX) and ".attn2.to_k." in k for k in shapes),
        label_embedding=f"{UNET_PREFIX}label_emb.weight" in shapes,
        first_stage_mid_attention=f"{VAE_PREFIX}encoder.mid.attn_1.q.weight" in shapes,
        low_scale_buffers=any(k.startswith("low_scale_model.") for k in shapes),
    )


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Variant:
    """One family: the preset it loads as, and the facts a state dict must show to be that family."""

    family: str
    description: str
    # Feature name -> required value, or a tuple of accepted values.
    requires: Mapping[str, Any]

    def mismatches(self, features: Features) -> list[str]:
        """The requirements ``features`` fails, in words (empty when this variant matches)."""
        failed = []
        for name, wanted in self.requires.items():
            got = getattr(features, name)
            accepted = wanted if isinstance(wanted, tuple) else (wanted,)
            if got not in accepted:
                failed.append(f"{name}={got!r} (needs {' or '.join(repr(a) for a in accepted)})")
        return failed


_SD_TEXT = dict(first_stage="kl", cross_attention=True, label_embedding=False, low_scale_buffers=False)

VARIANTS: tuple[Variant, ...] = (
    Variant("sd1", "Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 768-wide context, eps prediction",
            dict(condition_encoder="clip-openai", concat_channels=0, **_SD_TEXT)),
    Variant("sd1-inpaint", "Stable Diffusion 1.x inpainting: 9 UNet input channels (latent, mask, masked image)",
            dict(condition_encoder="clip-openai", concat_channels=5, **_SD_TEXT)),
    Variant("sd2", "Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder, 1024-wide context. The keys cannot "
                   "tell the 512 px eps model from the 768 px v model: eps is assumed, pass prediction='v' "
                   "for 768-v checkpoints (e.g. v2-1_768-ema-pruned)",
            dict(condition_encoder="openclip", concat_channels=0, **_SD_TEXT)),
    Variant("sd2-inpaint", "Stable Diffusion 2 inpainting: OpenCLIP text, 9 UNet input channels",
            dict(condition_encoder="openclip", concat_channels=5, **_SD_TEXT)),
    Variant("sd2-x4-upscaler", "Stable Diffusion x4 upscaler: OpenCLIP text, 7 UNet input channels "
                               "(latent + low-resolution image), noise level via the class embedding",
            dict(condition_encoder="openclip", first_stage="kl", concat_channels=3, label_embedding=True,
                 cross_attention=True)),
    Variant("ldm-cin256", "LDM class-conditional ImageNet 256: class embedding by cross-attention, VQ-f8",
            dict(condition_encoder="class", first_stage="vq", concat_channels=0, cross_attention=True)),
    Variant("ldm-text2img256", "LDM text-to-image 256 (LAION-400M): BERT-style text transformer, VQ-f4",
            dict(condition_encoder="bert", first_stage="vq", concat_channels=0, cross_attention=True)),
    Variant("ldm-sr", "LDM 4x super-resolution: low-resolution image concatenated (6 channels), no text",
            dict(condition_encoder=None, first_stage="vq", concat_channels=3, cross_attention=False)),
    Variant("ldm-inpaint", "LDM inpainting: masked image and mask concatenated (7 channels), VQ-f4 without attention",
            dict(condition_encoder=(None, "first-stage"), first_stage="vq", concat_channels=4,
                 cross_attention=False, first_stage_mid_attention=False)),
)

_VARIANTS_BY_FAMILY = {variant.family: variant for variant in VARIANTS}
# Families whose presets differ only in what keys cannot show: reached through ``prediction``.
_PREDICTION_FAMILIES = {("sd2", "v"): "sd2-v"}


@dataclass(frozen=True)
class Detection:
    """The registry entry a state dict matched, and the facts it matched on."""

    variant: Variant
    features: Features

    @property
    def family(self) -> str:
        return self.variant.family


def _refuse_partial_files(shapes: Shapes) -> None:
    if any(k.startswith(UNET_PREFIX) for k in shapes):
        return
    if any(k.startswith(("down_blocks.", "up_blocks.", "encoder.down_blocks.", "text_model.")) for k in shapes):
        raise CheckpointError(
            "this is one component in the diffusers layout, not a single-file checkpoint; "
            "load the whole diffusers folder with checkpoints.convert.load_diffusers_folder"
        )
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in shapes):
        raise CheckpointError("this is a stand-alone autoencoder (VAE) file, not a full model checkpoint")
    sample = sorted(shapes)[:5]
    raise CheckpointError(f"no UNet keys ({UNET_PREFIX}*): not a latent diffusion checkpoint (keys start {sample})")


def detect_family(state_dict: Mapping[str, Any], family: str | None = None) -> Detection:
    """Match a state dict against :data:`VARIANTS`; ``family`` forces an entry instead of detecting."""
    shapes = shapes_of(state_dict)
    if family is not None:
        base = {v: k for k, v in _PREDICTION_FAMILIES.items()}.get(family, (family,))[0]
        if base not in _VARIANTS_BY_FAMILY:
            raise CheckpointError(f"unknown family {family!r}; known: {sorted(_VARIANTS_BY_FAMILY)} and 'sd2-v'")
        _refuse_partial_files(shapes)
        return Detection(_VARIANTS_BY_FAMILY[base], read_features(shapes))
    _refuse_partial_files(shapes)
    features = read_features(shapes)
    matches = [variant for variant in VARIANTS if not variant.mismatches(features)]
    if len(matches) == 1:
        return Detection(matches[0], features)
    if matches:
        raise CheckpointError(f"ambiguous checkpoint: matches {[m.family for m in matches]}; pass family=...")
    closest = min(VARIANTS, key=lambda variant: len(variant.mismatches(features)))
    raise CheckpointError(
        f"unknown architecture: no family matches. Closest is {closest.family!r} ({closest.description}), "
        f"which differs in: {'; '.join(closest.mismatches(features))}. Pass family=... or config_yaml=... "
        "if you know what it is."
    )


# ---------------------------------------------------------------------------------------------
# Shapes -> configs


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers N in keys ``prefix + "N."...``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def derive_unet_config(shapes: Shapes, base: UNetConfig, prefix: str = UNET_PREFIX) -> UNetConfig:
    """The UNet config whose modules have exactly these shapes; head counts and ``legacy`` come from ``base``."""
    first = shapes[f"{prefix}input_blocks.0.0.weight"]
    model_channels, in_channels, dims = first[0], first[1], len(first) - 2
    out_channels = shapes[f"{prefix}out.2.weight"][0]
    output_blocks = _indices(shapes, f"{prefix}output_blocks.")

    def upsamples(i: int) -> bool:
        return any(
            f"{prefix}output_blocks.{i}.{j}.{leaf}" in shapes
            for j in (1, 2) for leaf in ("conv.weight", "in_layers.0.weight")
        )

    ups = [i for i in output_blocks if upsamples(i)]
    blocks_per_level = ups[0] + 1 if ups else len(output_blocks)
    num_res_blocks = blocks_per_level - 1
    levels = len(output_blocks) // blocks_per_level
    resblock_updown = any(
        f"{prefix}output_blocks.{i}.{j}.in_layers.0.weight" in shapes for i in ups for j in (1, 2)
    )

    channel_mult, attention_resolutions, self_attention_disabled = [], [], []
    spatial_transformer, depth, linear_proj, context_dim = False, base.transformer_depth, False, None
    for level in range(levels):
        block = f"{prefix}input_blocks.{1 + level * blocks_per_level}."
        channels = shapes[f"{block}0.out_layers.3.weight"][0]
        channel_mult.append(channels // model_channels)
        disabled = None
        if _has_prefix(shapes, f"{block}1."):
            attention_resolutions.append(2**level)
            if _has_prefix(shapes, f"{block}1.transformer_blocks."):
                spatial_transformer = True
                depth = len(_indices(shapes, f"{block}1.transformer_blocks."))
                linear_proj = len(shapes[f"{block}1.proj_in.weight"]) == 2
                context_dim = shapes[f"{block}1.transformer_blocks.0.attn2.to_k.weight"][1]
                self_key_width = shapes[f"{block}1.transformer_blocks.0.attn1.to_k.weight"][1]
                # A disabled self-attention attends to the context instead; only visible when widths differ.
                if self_key_width != channels:
                    disabled = True
                elif context_dim != channels:
                    disabled = False
        self_attention_disabled.append(disabled)

    disable_self_attentions = None
    if any(self_attention_disabled):
        preset_flags = base.disable_self_attentions or ()
        disable_self_attentions = tuple(
            flag if flag is not None else (preset_flags[i] if i < len(preset_flags) else False)
            for i, flag in enumerate(self_attention_disabled)
        )
    disable_middle = False
    middle_key = f"{prefix}middle_block.1.transformer_blocks.0.attn1.to_k.weight"
    if middle_key in shapes:
        disable_middle = shapes[middle_key][1] != model_channels * channel_mult[-1]

    emb_out = shapes[f"{prefix}input_blocks.1.0.emb_layers.1.weight"][0]
    label = shapes.get(f"{prefix}label_emb.weight")
    return dataclasses.replace(
        base,
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention_resolutions),
        use_spatial_transformer=spatial_transformer,
        transformer_depth=depth if spatial_transformer else base.transformer_depth,
        context_dim=context_dim,
        use_linear_in_transformer=linear_proj if spatial_transformer else base.use_linear_in_transformer,
        num_classes=label[0] if label else None,
        disable_self_attentions=disable_self_attentions,
        disable_middle_self_attn=disable_middle,
        use_scale_shift_norm=emb_out == 2 * model_channels * channel_mult[0],
        resblock_updown=resblock_updown,
        dims=dims,
    )


def derive_autoencoder_config(shapes: Shapes, base: AutoencoderConfig, prefix: str = VAE_PREFIX) -> AutoencoderConfig:
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


def derive_conditioner_config(shapes: Shapes, base: ConditionerConfig, prefix: str = COND_PREFIX) -> ConditionerConfig:
    """The condition encoder config with these shapes (``base`` supplies activation and head width rules)."""
    if isinstance(base, CLIPTextConfig):
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
        # The family fixes how many layers produce the context; files converted from diffusers
        # already lack the skipped last layer (diffusers drops it), so nothing is skipped then.
        used = base.layers - base.skip_last_layers
        skip = 0 if layers == used else min(base.skip_last_layers, layers - 1)
        return dataclasses.replace(
            base, vocab_size=tokens[0], width=tokens[1], context_length=positions[0], layers=layers,
            heads=_clip_heads(tokens[1], base), skip_last_layers=skip,
        )
    if isinstance(base, BERTTextConfig):
        body = f"{prefix}transformer."
        tokens = shapes[f"{body}token_emb.weight"]
        inner = shapes[f"{body}attn_layers.layers.0.1.to_q.weight"][0]
        hidden = shapes[f"{body}attn_layers.layers.1.1.net.0.0.weight"][0]
        return dataclasses.replace(
            base, vocab_size=tokens[0], n_embed=tokens[1], max_seq_len=shapes[f"{body}pos_emb.emb.weight"][0],
            n_layer=len(_indices(shapes, f"{body}attn_layers.layers.")) // 2,
            dim_head=inner // base.heads, ff_mult=hidden // tokens[1],
        )
    if isinstance(base, ClassEmbedderConfig):
        n_classes, embed_dim = shapes[f"{prefix}embedding.weight"]
        return ClassEmbedderConfig(n_classes=n_classes, embed_dim=embed_dim)
    return None


def family_preset(detection: Detection, prediction: str | None = None) -> ModelSpec:
    """The preset for a detection, switched to the sibling family for ``prediction`` where one exists."""
    family = _PREDICTION_FAMILIES.get((detection.family, prediction), detection.family)
    spec = preset(family)
    if prediction is not None and prediction != spec.prediction:
        if prediction not in ("eps", "v", "x0"):
            raise CheckpointError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        spec = dataclasses.replace(spec, prediction=prediction)
    return spec


def derive_spec(state_dict: Mapping[str, Any], detection: Detection, prediction: str | None = None) -> ModelSpec:
    """The family preset with every size replaced by what the state dict's shapes say."""
    shapes = shapes_of(state_dict)
    spec = family_preset(detection, prediction)
    try:
        return dataclasses.replace(
            spec,
            unet=derive_unet_config(shapes, spec.unet),
            autoencoder=derive_autoencoder_config(shapes, spec.autoencoder),
            conditioner=derive_conditioner_config(shapes, spec.conditioner),
        )
    except (KeyError, IndexError, ZeroDivisionError) as error:
        raise CheckpointError(
            f"looks like {detection.family!r} but a tensor its architecture needs is missing or malformed: {error}"
        ) from None
