"""Random LoRA files for the tests, in the layouts users have them, named after a diffusers model's layers."""
from __future__ import annotations

import re

import torch
from torch import nn

# The layers kohya's trainer adapts in a UNet (attention, feed-forward, projections) and LoCon adds
# (the ResNet convolutions, time embedding projections, shortcuts, down/up-samplers).
UNET_LAYERS = re.compile(r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|"
                         r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|samplers\.0\.conv)$")
TEXT_LAYERS = re.compile(r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")


def layers(model: nn.Module, pattern: re.Pattern) -> dict[str, nn.Module]:
    """The Linear / Conv2d layers of ``model`` whose names match ``pattern``, named as LoRA files name
    them (a text encoder's with the ``text_model.`` level that transformers 5 leaves out)."""
    text = type(model).__name__.startswith("CLIPText")
    return {("text_model." if text and not name.startswith("text_model.") else "") + name: module
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and pattern.fullmatch(name)}


def _factors(module: nn.Module, rank: int, generator: torch.Generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, nn.Linear):
        down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
    else:  # LoCon: the kernel on the down factor
        down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (torch.randn(down_shape, generator=generator) * scale, torch.randn(up_shape, generator=generator) * scale)


def kohya_lora(modules: dict[str, nn.Module], prefix: str, *, rank: int = 4, alpha: float = 2.0, seed: int = 0,
               scale: float = 0.2) -> dict[str, torch.Tensor]:
    """kohya's layout: ``<prefix><name with '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in modules.items():
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = _factors(module, rank, generator, scale)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


def peft_lora(modules: dict[str, nn.Module], prefix: str, *, rank: int = 4, seed: int = 0,
              scale: float = 0.2) -> dict[str, torch.Tensor]:
    """diffusers' PEFT layout: ``<prefix><name>.lora_A.weight`` / ``.lora_B.weight``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in modules.items():
        down, up = _factors(module, rank, generator, scale)
        tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"] = down, up
    return tensors
