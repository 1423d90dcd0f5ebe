"""What a state dict reveals about its architecture: the facts families are told apart by.

:func:`read_features` reduces a state dict (tensors, or just shapes) to a few facts -- which text
encoders, UNet input and output channels, VQ or KL first stage, ... -- and each family states which
facts it needs (ComfyUI's ``model_detection`` works the same way). Families are told apart by the
keys and shapes a file holds, never by its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."  # SD 1.x/2.x and the CompVis models
EMBEDDERS_PREFIX = "conditioner.embedders."  # SDXL

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape for anything with a ``.shape`` (tensors, :class:`~.io.TensorInfo`) or a plain shape."""
    return {k: tuple(getattr(v, "shape", v)) for k, v in state_dict.items()}


@dataclass(frozen=True)
class Features:
    """What a state dict reveals about its architecture, in the terms families match on."""

    # "clip-openai", "openclip", "bert", "class", "first-stage", "embedders" (SDXL), "unknown", None
    condition_encoder: str | None
    # The text encoders under conditioner.embedders, in order (SDXL base: clip-openai, openclip).
    embedders: tuple[str, ...]
    first_stage: str | None  # "kl", "vq", None
    unet_in_channels: int | None
    unet_out_channels: int | None
    # Channels concatenated to the noisy latent (mask, masked image, low-resolution image).
    concat_channels: int | None
    cross_attention: bool
    label_embedding: bool  # a class-embedding table (label_emb.weight)
    adm_channels: int | None  # width of SDXL's ADM vector input (label_emb.0.0.weight)
    first_stage_mid_attention: bool
    low_scale_buffers: bool


def text_encoder_kind(shapes: Shapes, prefix: str) -> str | None:
    """Which text encoder layout the keys under ``prefix`` hold, if any."""
    if f"{prefix}transformer.text_model.embeddings.token_embedding.weight" in shapes:
        return "clip-openai"
    if f"{prefix}model.token_embedding.weight" in shapes:
        return "openclip"
    return None


def _condition_encoder_kind(shapes: Shapes) -> str | None:
    clip = text_encoder_kind(shapes, COND_PREFIX)
    if clip is not None:
        return clip
    if f"{COND_PREFIX}transformer.token_emb.weight" in shapes:
        return "bert"
    if f"{COND_PREFIX}embedding.weight" in shapes:
        return "class"
    if f"{COND_PREFIX}encoder.conv_in.weight" in shapes:
        return "first-stage"  # CompVis "__is_first_stage__": the autoencoder stored a second time
    if any(k.startswith(COND_PREFIX) for k in shapes):
        return "unknown"
    if any(k.startswith(EMBEDDERS_PREFIX) for k in shapes):
        return "embedders"
    return None


def _embedders(shapes: Shapes) -> tuple[str, ...]:
    """Text encoder kinds under ``conditioner.embedders.N`` for N = 0, 1, ... (parameter-free embedders hold no keys)."""
    kinds = []
    index = 0
    while any(k.startswith(f"{EMBEDDERS_PREFIX}{index}.") for k in shapes):
        kinds.append(text_encoder_kind(shapes, f"{EMBEDDERS_PREFIX}{index}.") or "unknown")
        index += 1
    return tuple(kinds)


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
    adm = shapes.get(f"{UNET_PREFIX}label_emb.0.0.weight")
    return Features(
        condition_encoder=_condition_encoder_kind(shapes),
        embedders=_embedders(shapes),
        first_stage=first_stage,
        unet_in_channels=unet_in,
        unet_out_channels=unet_out,
        concat_channels=unet_in - unet_out if unet_in is not None and unet_out is not None else None,
        cross_attention=any(k.startswith(UNET_PREFIX) and ".attn2.to_k." in k for k in shapes),
        label_embedding=f"{UNET_PREFIX}label_emb.weight" in shapes,
        adm_channels=adm[1] if adm else None,
        first_stage_mid_attention=f"{VAE_PREFIX}encoder.mid.attn_1.q.weight" in shapes,
        low_scale_buffers=any(k.startswith("low_scale_model.") for k in shapes),
    )
