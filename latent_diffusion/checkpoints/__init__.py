"""Reading, detecting, converting and writing the weight files users own.

Names are imported on first use, so that ``checkpoints.io`` (which the model families need) loads
without the loaders that need the families.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "io", "LoadedModel": "load", "load_checkpoint": "load",
    "describe_checkpoint": "describe", "format_description": "describe",
    "load_diffusers_folder": "convert", "save_diffusers_folder": "convert", "save_single_file": "convert",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
