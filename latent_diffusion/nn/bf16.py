"""bf16 mode: the UNet's weights in bfloat16 and its matmuls and convolutions run in bfloat16.

On CPUs with native bfloat16 dot products (AVX512-BF16, AMX) those run at about twice the fp32
rate, so a sampling step takes about half the time (SD 1.5 at 32x32 latents: 1.25 s against
2.63 s) and the weights half the memory. Autocast keeps normalisations and softmax in fp32, and
attention runs in fp32 altogether (see ``nn.attention.attention``). The price is precision: a
step's output is about 1.7% (relative) from fp32 with random SD weights, and a 20-step image about
30 dB PSNR from the exact one. On CPUs without native bfloat16 the same arithmetic is emulated and
many times slower (MEASURED.md: 30x), so this mode refuses them (a Pipeline asked for bf16 mode
there says so and runs the exact fp32 path). Where a CPU has AVX512-BF16 but no AMX, bf16 may
compute no faster than fp32 (MEASURED.md); the weights still take half the memory.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CUDA: Ampere or later)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class BF16Autocast:
    """Calls ``module`` (converted to bfloat16 in place) under bfloat16 autocast; returns fp32."""

    def __init__(self, module: nn.Module) -> None:
        device = next(module.parameters()).device
        if not has_native_bf16(device):
            raise ValueError(f"bf16 mode needs native bfloat16 arithmetic, which this {device.type} device lacks: "
                             "there it would be many times slower than fp32")
        self.module = module.to(torch.bfloat16)
        self.device_type = device.type

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(*args, **kwargs).float()
