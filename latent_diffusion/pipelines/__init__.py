"""Tasks (txt2img, img2img, inpaint, upscale, sample) on a loaded model: ``Pipeline.from_checkpoint(path)``."""
from __future__ import annotations

from typing import Any

__all__ = ["GenerationResult", "Pipeline", "default_checkpoint_path"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``ldm --help`` and the image helpers do not load the models.
    if name in __all__:
        from latent_diffusion.pipelines import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
