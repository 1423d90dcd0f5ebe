"""ControlNet (Zhang et al. 2023): a trainable copy of a UNet's encoder that steers the UNet.

The copy sees the noisy latent, the timestep and the text like the UNet, plus a control image (an
edge map, a pose, ...) brought to latent resolution by a small convolutional hint encoder and added
after the first convolution. Each encoder block's output passes a zero-initialised 1x1 convolution
and becomes a residual for the UNet's matching skip connection; the middle block's for its middle
(``UNetModel.forward(control=...)``). The module tree and so the state-dict keys are the original
release's: ``input_hint_block``, ``input_blocks``, ``zero_convs.N.0``, ``middle_block``,
``middle_block_out.0`` (found under ``control_model.`` in the released files).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from latent_diffusion.config import ConfigError, UNetConfig
from latent_diffusion.models.unet import TimestepEmbedSequential, UNetModel, _validate
from latent_diffusion.nn.layers import conv_nd, zero_init

# The released hint encoders: 16 channels at full size, then three halvings to 32, 96 and 256 (/8).
HINT_WIDTHS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet for UNets with ``unet``'s encoder (its input and output channels are the latent's)."""

    unet: UNetConfig
    hint_channels: int = 3
    # The hint encoder's widths: one stride-2 convolution between consecutive entries, so a control
    # image is ``2 ** (len - 1)`` times the latent's size (the VAE's factor).
    hint_widths: tuple[int, ...] = HINT_WIDTHS
    # Residuals averaged over the image (the "shuffle" ControlNet): only the cond half receives them.
    global_average_pooling: bool = False

    def __post_init__(self) -> None:
        if self.hint_channels < 1:
            raise ConfigError(f"ControlNetConfig: hint_channels must be >= 1, got {self.hint_channels}")
        if len(self.hint_widths) < 1 or min(self.hint_widths) < 1:
            raise ConfigError(f"ControlNetConfig: hint_widths must be positive widths, got {self.hint_widths}")
        object.__setattr__(self, "hint_widths", tuple(int(w) for w in self.hint_widths))

    @property
    def hint_factor(self) -> int:
        """How many times larger than the latent the control image is."""
        return 2 ** (len(self.hint_widths) - 1)


def _hint_encoder(config: ControlNetConfig, dims: int, out_channels: int) -> nn.Sequential:
    """Convolutions with SiLU between them: the first at full size, a same-width and a stride-2 one per
    halving, the last zero-initialised (as the release numbers them: 0, 2, 4, ... with SiLUs between)."""
    widths = config.hint_widths
    layers: list[nn.Module] = [conv_nd(dims, config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for width, wider in zip(widths, widths[1:]):
        layers += [conv_nd(dims, width, width, 3, padding=1), nn.SiLU(),
                   conv_nd(dims, width, wider, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_init(conv_nd(dims, widths[-1], out_channels, 3, padding=1)))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """The encoder copy, its zero convolutions and the hint encoder; ``forward`` returns the residuals.

    The blocks are made by the UNet's own constructors, so the copy has the structure and the key
    names of the UNet it controls; those constructors (and the input checks) read ``self.config``,
    the UNet config, while ``self.control_config`` holds the whole ControlNet config.
    """

    _res_block = UNetModel._res_block
    _downsample = UNetModel._downsample
    _attention = UNetModel._attention
    _check_inputs = UNetModel._check_inputs
    _build_embeddings = UNetModel._build_embeddings
    _encoder_blocks = UNetModel._encoder_blocks
    _embed = UNetModel._embed

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        unet = config.unet
        _validate(unet)
        self.config = unet
        self.control_config = config
        self.cross_attention = unet.use_spatial_transformer and unet.context_dim is not None
        base = unet.model_channels
        self._build_embeddings()
        self.input_hint_block = _hint_encoder(config, unet.dims, base)
        self._build_encoder()
        channels = base * unet.channel_mult[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(channels, channels), self._attention(channels, None), self._res_block(channels, channels))
        self.middle_block_out = self._zero_conv(channels)

    def _zero_conv(self, channels: int) -> nn.Sequential:
        return nn.Sequential(zero_init(conv_nd(self.config.dims, channels, channels, 1)))

    def _build_encoder(self) -> None:
        """The UNet's input blocks, each with its zero convolution."""
        self.input_blocks, self.zero_convs = nn.ModuleList(), nn.ModuleList()
        for block, channels in self._encoder_blocks():
            self.input_blocks.append(block)
            self.zero_convs.append(self._zero_conv(channels))

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Residuals for the UNet's skip connections (one per input block) and, last, its middle block.

        ``x``, ``timesteps``, ``context`` and ``y`` are what the UNet gets; ``hint`` is the control
        image [B, hint_channels, H * f, W * f] in [0, 1], ``f`` the config's ``hint_factor``.
        """
        timesteps = self._check_inputs(x, timesteps, context, y)
        self._check_hint(x, hint)
        h, emb, context = self._embed(x, timesteps, context, y)
        residuals = []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + self.input_hint_block(hint.to(h.dtype))
            residuals.append(zero_conv(h))
        residuals.append(self.middle_block_out(self.middle_block(h, emb, context)))
        if self.control_config.global_average_pooling:
            residuals = [r.mean(dim=tuple(range(2, r.ndim)), keepdim=True) for r in residuals]
        return residuals

    def _check_hint(self, x: torch.Tensor, hint: torch.Tensor) -> None:
        config = self.control_config
        factor = config.hint_factor
        expected = (x.shape[0], config.hint_channels, *(size * factor for size in x.shape[2:]))
        if tuple(hint.shape) != expected:
            raise ValueError(f"the control image must be shaped {list(expected)} ({factor}x the latent "
                             f"{list(x.shape[2:])}), got {list(hint.shape)}")


def controlnet_config_for(unet: UNetConfig, **options) -> ControlNetConfig:
    """The ControlNet config that copies ``unet``'s encoder (its input is the plain latent, even for
    an inpainting UNet that takes extra channels)."""
    latent = unet.out_channels
    return ControlNetConfig(dataclasses.replace(unet, in_channels=latent), **options)
