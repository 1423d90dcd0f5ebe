"""Building blocks of the CompVis UNet: normalisation, timestep embedding, resampling, ResBlock.

Attribute names (``in_layers``, ``emb_layers``, ``op``, ``conv``...) are those of CompVis
``ldm/modules/diffusionmodules/openaimodel.py`` so that state dicts load without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL_BY_DIMS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D convolution."""
    try:
        return _CONV_BY_DIMS[dims](*args, **kwargs)
    except KeyError:
        raise ValueError(f"unsupported number of spatial dims {dims} (expected 1, 2 or 3)") from None


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype, as the reference ``GroupNorm32``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # bf16 mode: the CPU kernel reads bf16 and sums in fp32 itself, so the same result comes
            # without a fp32 copy of the input and a bf16 copy of the output (autocast would add them).
            with torch.autocast("cpu", enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's normalisation: 32 groups (eps 1e-5 in ResBlocks, 1e-6 in SpatialTransformer)."""
    if channels % 32:
        raise ValueError(f"GroupNorm with 32 groups needs a channel count divisible by 32, got {channels}")
    return GroupNorm32(32, channels, eps=eps)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N]: cosines, then sines.

    Frequencies are ``max_period ** (-i / half)`` for i < half, as in CompVis ``timestep_embedding``
    (diffusers calls this order ``flip_sin_to_cos=True`` with ``freq_shift=0``).
    """
    half = dim // 2
    # Same float32 operation order as the reference, so large timesteps round identically.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * exponent.exp()[None]
    embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            # 3-D signals are upsampled in the inner two dimensions only (reference behaviour).
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if hasattr(self, "conv"):
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution or average pooling (key ``op`` either way)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = _AVG_POOL_BY_DIMS[dims](kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it."""
    # Output projections of residual branches start at zero (reference ``zero_module``) so a fresh
    # network is the identity on its skip paths; loaded checkpoints overwrite this.
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (``up``/``down``)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        # Parameter-free resamplers; applied to both the branch (between activation and conv, as
        # the reference does) and the skip path.
        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample(channels, False, dims)
        elif down:
            self.resample = Downsample(channels, False, dims)
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_init(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        h = act_in(norm_in(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = conv_in(h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.view(*emb_out.shape, *([1] * (h.ndim - 2)))
        norm_out, act_out, drop_out, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            # Improved DDPM (Nichol & Dhariwal 2021): the embedding modulates the normalised features.
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm_out(h), 1 + scale)
        else:
            h = norm_out(h + emb_out)
        h = conv_out(drop_out(act_out(h)))
        return self.skip_connection(x) + h
