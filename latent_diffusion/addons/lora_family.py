"""Which model family a LoRA file was made for, from its tensors' names and shapes (or its metadata).

The surest sign is the width of the text context its cross-attention layers read (768 for SD 1.x,
1024 for SD 2.x, 2048 for SDXL, 1280 for SDXL's refiner): a LoRA for one family can share layer names,
and even some layer shapes, with another, and would then change those layers silently.
"""
from __future__ import annotations

from typing import Mapping

from latent_diffusion.addons.lora_file import split_key

# kohya's ``ss_base_model_version`` and the model-spec ``modelspec.architecture`` values, by family.
_METADATA_FAMILIES = (("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("sd_v2", "sd2"),
                      ("stable-diffusion-v2", "sd2"), ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"))
# The factor whose second dimension is a layer's input width, by kind.
_INPUT_FACTORS = ("down", "hada_w1_b")


def context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The text-context width the file's cross-attention key/value layers read (None: it has none)."""
    for key, shape in shapes.items():
        split = split_key(key)
        if split is None or len(shape) < 2:
            continue
        _prefix, module, part = split
        name = module.replace(".", "_")
        if part in _INPUT_FACTORS and "attn2" in name and name.endswith(("to_k", "to_v")):
            return shape[1]
    return None


def _text_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key, shape in shapes.items():
        split = split_key(key)
        if split and split[0] in ("lora_te_", "text_encoder.") and split[2] in _INPUT_FACTORS and len(shape) == 2:
            return shape[1]
    return None


def _family_with(predicate) -> str | None:
    from latent_diffusion.families import FAMILIES

    return next((f.name for f in FAMILIES if f.preset is not None and f.requires is not None and predicate(f.preset)),
                None)


def seems_made_for(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA file looks made for (None: its keys and metadata do not say)."""
    width = context_width(shapes)
    if width is not None:
        return _family_with(lambda spec: spec.unet.context_dim == width)
    if any((split_key(key) or ("",))[0] in ("lora_te1_", "lora_te2_", "text_encoder_2.") for key in shapes):
        return "sdxl"
    text = _text_width(shapes)
    if text is not None:
        return _family_with(lambda spec: getattr(spec.conditioner, "width", None) == text)
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(field, ""))
        for marker, family in _METADATA_FAMILIES:
            if value.startswith(marker):
                return family
    return None
