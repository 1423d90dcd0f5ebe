"""The model families, one object each, and telling which one a state dict holds.

``detect(state_dict)`` matches a file's keys and shapes against every family's requirements
(exactly one must match); ``get_family(name)`` and ``family_of(spec)`` find the object for a name.
"""
from __future__ import annotations

from typing import Any, Mapping

from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.config import ModelSpec
from latent_diffusion.families.base import Family
from latent_diffusion.families.compvis import LDMClassConditional, LDMInpaint, LDMSuperResolution, LDMText2Img
from latent_diffusion.families.custom import Custom
from latent_diffusion.families.features import UNET_PREFIX, Features, read_features, shapes_of
from latent_diffusion.families.sd import SD1, SD2, SD2V, SD1Inpaint, SD2Inpaint, SD2Upscaler
from latent_diffusion.families.sdxl import SDXL, SDXLInpaint, SDXLRefiner

FAMILIES: tuple[Family, ...] = (
    SD1(), SD1Inpaint(), SD2(), SD2V(), SD2Inpaint(), SD2Upscaler(),
    SDXL(), SDXLRefiner(), SDXLInpaint(),
    LDMClassConditional(), LDMText2Img(), LDMSuperResolution(), LDMInpaint(),
    Custom(),
)
_BY_NAME = {family.name: family for family in FAMILIES}

__all__ = ["FAMILIES", "Family", "Features", "detect", "family_of", "get_family", "read_features", "shapes_of"]


def get_family(name: str) -> Family:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise CheckpointError(f"unknown family {name!r}; known: {sorted(_BY_NAME)}") from None


def family_of(spec: ModelSpec) -> Family:
    """The family object a spec belongs to."""
    return get_family(spec.family)


def _refuse_partial_files(shapes: Mapping[str, tuple[int, ...]]) -> None:
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


def detect(state_dict: Mapping[str, Any], family: str | None = None) -> Family:
    """The one family whose requirements the state dict meets; ``family`` names it instead of detecting."""
    shapes = shapes_of(state_dict)
    _refuse_partial_files(shapes)
    if family is not None:
        return get_family(family)
    features = read_features(shapes)
    matches = [candidate for candidate in FAMILIES if not candidate.mismatches(features)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CheckpointError(f"ambiguous checkpoint: matches {[m.name for m in matches]}; pass family=...")
    detectable = [candidate for candidate in FAMILIES if candidate.requires is not None]
    closest = min(detectable, key=lambda candidate: len(candidate.mismatches(features)))
    raise CheckpointError(
        f"unknown architecture: no family matches. Closest is {closest.name!r} ({closest.description}), "
        f"which differs in: {'; '.join(closest.mismatches(features))}. Pass family=... or config_yaml=... "
        "if you know what it is."
    )
