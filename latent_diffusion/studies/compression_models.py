"""The models of the compression study, as data: one first stage and one UNet per factor f.

The canvas is the shapes world's 64x64, so f = 32 leaves a 2x2 latent. Latent channels grow with f
(f = 4: 4 channels, f = 32: 64), so a higher f loses detail but not all capacity. f = 1 has no first
stage: the LDM diffuses pixels.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from latent_diffusion.config import AutoencoderConfig, UNetConfig

if TYPE_CHECKING:  # the CLI reads FACTORS without importing torch
    import torch
    from torch import nn

CANVAS = 64
FACTORS = (1, 2, 4, 8, 16, 32)
VQ_FACTORS = (4, 8)
LATENT_CHANNELS = {1: 3, 2: 3, 4: 4, 8: 8, 16: 16, 32: 64}
VQ_CODEBOOK = 512
# The frozen text encoder every LDM shares (the built-in model's): its width is the UNet's context.
CONTEXT_DIM = 64
CONTEXT_TOKENS = 32  # its caption length: cross-attention's FLOPs grow with it
UNET_WIDTH = 32


def check_factor(f: int) -> None:
    if f not in FACTORS:
        raise ValueError(f"the downsampling factor must be one of {', '.join(map(str, FACTORS))}; got {f}")


def first_stage_config(f: int, kind: str = "kl") -> AutoencoderConfig:
    """The shapes autoencoder (built-in recipe: 32 channels, one res block a level, MSE) deepened to f."""
    check_factor(f)
    if f == 1:
        raise ValueError("f = 1 has no first stage: the LDM works on pixels")
    if kind not in ("kl", "vq"):
        raise ValueError(f"first-stage kind must be 'kl' or 'vq'; got {kind!r}")
    channels = LATENT_CHANNELS[f]
    levels = int(math.log2(f)) + 1
    return AutoencoderConfig(
        kind=kind, embed_dim=channels, z_channels=channels, double_z=kind == "kl", resolution=CANVAS,
        ch=32, ch_mult=(1, 2, 2, 4, 4, 4)[:levels], num_res_blocks=1, attn_resolutions=(), norm_groups=8,
        n_embed=VQ_CODEBOOK if kind == "vq" else 0,
    )


def latent_side(f: int) -> int:
    check_factor(f)
    return CANVAS // f


def unet_config(f: int) -> UNetConfig:
    """The built-in model's UNet (32 channels, widths 1-2-4, cross-attention) fitted to the latent side.

    Up to three levels, fewer where the latent is too small to halve twice more (the lowest level
    keeps at least 2x2: GroupNorm over one pixel is not a norm); a short UNet keeps the deepest,
    widest levels, so that a small latent is treated like the bottom of the full network rather than
    by a network a tenth its size. Attention only at 16x16 and below, so that f = 1-2 pay for their
    resolution in convolutions, not in 4096-token attention.
    """
    side = latent_side(f)
    levels = max(1, min(3, int(math.log2(side))))
    attention = tuple(2**level for level in range(levels) if side // 2**level <= 16)
    channels = LATENT_CHANNELS[f]
    return UNetConfig(
        in_channels=channels, out_channels=channels, model_channels=UNET_WIDTH * 2 ** (3 - levels),
        channel_mult=(1, 2, 4)[:levels],
        num_res_blocks=1, attention_resolutions=attention, num_heads=4, use_spatial_transformer=True,
        transformer_depth=1, context_dim=CONTEXT_DIM, transformer_positions=True,
    )


def forward_flops(network: nn.Module, *inputs: torch.Tensor, **kwargs) -> int:
    """Floating-point operations (2 per multiply-add) of one forward call, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(*inputs, **kwargs)
    return int(counter.get_total_flops())


def unet_flops_per_image(network: nn.Module, f: int, context_tokens: int = CONTEXT_TOKENS) -> int:
    """Forward FLOPs of the UNet for one latent; a training step costs about three times this."""
    import torch

    side, channels = latent_side(f), LATENT_CHANNELS[f]
    latent = torch.zeros(2, channels, side, side)  # two: GroupNorm in training mode refuses one 1x1 value
    flops = forward_flops(network, latent, torch.zeros(2), context=torch.zeros(2, context_tokens, CONTEXT_DIM))
    return flops // 2
