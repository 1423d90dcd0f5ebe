"""bf16 mode: the UNet's weights in bfloat16 and its matmuls, convolutions and attention run in bfloat16.

On CPUs with AMX, bfloat16 products run several times faster than fp32 (SD 1.5's UNet step at 32x32
latents on 2 cores of a Xeon: 0.40 s against 1.37 s exact); with AVX512-BF16 alone they may run no
faster than fp32 (MEASURED.md), and the weights still take half the memory. Sums stay in fp32 inside
the kernels: normalisations (``nn.layers.GroupNorm32`` reads bf16 and sums in fp32), softmax and
the products' accumulators. In small UNets so do the residual streams, the sums each block adds its
branch to: the layers that begin a stream hand on fp32 (``stream_starts``), a bf16 branch added to it
gives fp32, so the branches' rounding does not pile up over the network's depth; the norms that read
the streams keep fp32 weights. A UNet step's error against fp32: 1.07% instead of 1.44% (the built-in
model), 1.41% instead of 1.67% (random SD 1.5 weights; not the default there, see
FP32_STREAMS_BELOW). That is the price of the mode: a 20-step SD image is about 30 dB PSNR from the
exact one. On CPUs without native bfloat16 the same arithmetic is emulated and many times slower
(MEASURED.md: 30x), so this mode refuses them (a Pipeline asked for bf16 mode there says so and runs
the exact fp32 path).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from latent_diffusion.nn.attention import SpatialTransformer
from latent_diffusion.nn.layers import Downsample, ResBlock, Upsample


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CUDA: Ampere or later)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


# fp32 streams double the bytes of the elementwise work between products (norms, activations, adds,
# concatenations) and add casts: free where a step is bound by its layer calls (the built-in model,
# 6 M parameters: 18 ms a step either way), 5-12% of a step in SD 1.5's UNet at 32x32 latents with AMX
# (0.46 s against 0.42; its images are closer to the exact ones than OpenVINO's without them).
FP32_STREAMS_BELOW = 100_000_000


class BF16Autocast:
    """Calls ``module`` (converted to bfloat16 in place) under bfloat16 autocast; returns fp32."""

    def __init__(self, module: nn.Module, fp32_streams: bool | None = None) -> None:
        """``fp32_streams``: sum the residual streams in fp32 (default: for UNets below
        FP32_STREAMS_BELOW parameters, whose steps are bound by calls, not by memory traffic)."""
        device = next(module.parameters()).device
        if not has_native_bf16(device):
            raise ValueError(f"bf16 mode needs native bfloat16 arithmetic, which this {device.type} device lacks: "
                             "there it would be many times slower than fp32")
        if fp32_streams is None:
            fp32_streams = sum(parameter.numel() for parameter in module.parameters()) < FP32_STREAMS_BELOW
        self.module = module.to(torch.bfloat16)
        self.device_type = device.type
        self.fp32_hooks = []
        if fp32_streams:
            for layer in module.modules():
                if isinstance(layer, (nn.LayerNorm, nn.GroupNorm)):
                    layer.float()  # normalising an fp32 stream; a handful of parameters
            self.fp32_hooks = [layer.register_forward_hook(_as_fp32) for layer in stream_starts(module)]

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(*args, **kwargs).float()


def stream_starts(module: nn.Module) -> list[nn.Module]:
    """The layers of a UNet whose outputs begin a residual stream: its first convolution,
    convolutional resamplers, ResBlocks' projected skips and transformers' input projections. Every
    other layer's output is a branch added to one; a bf16 branch added to an fp32 stream gives fp32."""
    layers = [module.input_blocks[0][0]] if hasattr(module, "input_blocks") else []
    for layer in module.modules():
        if isinstance(layer, Downsample) and isinstance(layer.op, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            layers.append(layer.op)
        elif isinstance(layer, Upsample) and hasattr(layer, "conv"):
            layers.append(layer.conv)
        elif isinstance(layer, ResBlock) and not isinstance(layer.skip_connection, nn.Identity):
            layers.append(layer.skip_connection)
        elif isinstance(layer, SpatialTransformer):
            layers.append(layer.proj_in)
    return layers


def _as_fp32(layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return output.float()
