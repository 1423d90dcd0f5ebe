"""bf16 mode: the UNet's weights in bfloat16 and its matmuls, convolutions and attention run in bfloat16.

On CPUs with AMX, bfloat16 products run several times faster than fp32 (SD 1.5's UNet step at 32x32
latents on 2 cores of a Xeon: 0.40 s against 1.37 s exact); with AVX512-BF16 alone they may run no
faster than fp32 (MEASURED.md), and the weights still take half the memory. Sums stay in fp32 inside
the kernels: normalisations (``nn.layers.GroupNorm32`` reads bf16 and sums in fp32), softmax and
the products' accumulators. The price is precision: a step's output is about 1.7% (relative) from
fp32 with random SD weights, and a 20-step image about 30 dB PSNR from the exact one. On CPUs without
native bfloat16 the same arithmetic is emulated and many times slower (MEASURED.md: 30x), so this
mode refuses them (a Pipeline asked for bf16 mode there says so and runs the exact fp32 path).
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
