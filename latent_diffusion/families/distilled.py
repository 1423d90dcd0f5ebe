"""Distilled few-step models, which keep their base family's shapes, told apart by what their files say.

SD-Turbo and SDXL-Turbo (adversarial diffusion distillation) have exactly the shapes of SD 2.1 and
SDXL, so their keys cannot tell them. What can: a file's safetensors metadata
(``modelspec.title`` or ``modelspec.architecture`` naming Turbo), its name (``sd_turbo.safetensors``,
``sd_xl_turbo_1.0_fp16.safetensors``: any name with "turbo" in it), or a diffusers folder's scheduler
(Euler ancestral on "trailing" timesteps, as those folders ship). Such a model runs with
:data:`TURBO` for every option the user leaves unset; the same options given by hand run any model so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_METADATA_FIELDS = ("modelspec.title", "modelspec.architecture")
_NAME_WORD = "turbo"


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model runs with when the user names no scheduler, steps, guidance scale or size.

    The sampler stays the commands' default, Euler a, which is the one these models were shown with.
    """

    scheduler: str
    steps: int
    guidance_scale: float  # 1: no guidance, one network evaluation per step
    image_size: int


# Trained on 4 timesteps ending at T-1 ("trailing"), without guidance, at 512 px (SDXL-Turbo too).
TURBO = SamplingDefaults(scheduler="trailing", steps=1, guidance_scale=1.0, image_size=512)


def sampling_defaults_for(source: Path | None) -> SamplingDefaults | None:
    """The few-step defaults of the model at ``source`` (file or diffusers folder); None: an ordinary model."""
    if source is None:
        return None
    source = Path(source)
    if _NAME_WORD in source.stem.lower():
        return TURBO
    said = _diffusers_scheduler_says_turbo(source) if source.is_dir() else _metadata_says_turbo(source)
    return TURBO if said else None


def _metadata_says_turbo(path: Path) -> bool:
    from latent_diffusion.checkpoints.io import read_safetensors_metadata, sniff_format

    if not path.is_file() or sniff_format(path) != "safetensors":
        return False
    metadata = read_safetensors_metadata(path)
    return any(_NAME_WORD in str(metadata.get(field, "")).lower() for field in _METADATA_FIELDS)


def _diffusers_scheduler_says_turbo(folder: Path) -> bool:
    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # no scheduler config (or an unreadable one): nothing said
    return (isinstance(config, dict) and config.get("_class_name") == "EulerAncestralDiscreteScheduler"
            and config.get("timestep_spacing") == "trailing")
