"""A trained LoRA written as kohya's trainer writes one, which A1111, ComfyUI, diffusers and our loader read.

Per layer ``<name>.lora_down.weight`` [rank, in], ``<name>.lora_up.weight`` [out, rank] and
``<name>.alpha`` (a scalar); the names are the layers' diffusers module names under ``lora_unet_`` /
``lora_te_`` with '.' written '_'. The ``ss_*`` metadata says the rank, alpha and base model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

# Our family -> kohya's ``ss_base_model_version`` (read back by addons/lora_family.py).
_BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def kohya_tensors(factors: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The file's tensors from ``{"<name>.lora_down.weight" / "<name>.lora_up.weight": factor}`` and each layer's alpha."""
    tensors = {key: value.detach().float().cpu().contiguous() for key, value in factors.items()}
    for name, alpha in alphas.items():
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def kohya_metadata(family: str, rank: int, alpha: float, steps: int) -> dict[str, str]:
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_steps": str(steps), "ss_v2": str(family == "sd2"), "format": "pt"}
    if family in _BASE_MODEL_VERSIONS:
        metadata["ss_base_model_version"] = _BASE_MODEL_VERSIONS[family]
    return metadata


def write_kohya_lora(path: Path, factors: Mapping[str, torch.Tensor], alphas: Mapping[str, float],
                     metadata: Mapping[str, str]) -> Path:
    from latent_diffusion.checkpoints.io import save_safetensors

    save_safetensors(kohya_tensors(factors, alphas), path, dict(metadata))
    return path
