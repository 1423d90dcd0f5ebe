"""The denoising UNet of Latent Diffusion / Stable Diffusion 1.x, 2.x and XL (``openaimodel.UNetModel``).

The module tree, and so every state-dict key, is the reference's: ``time_embed``, ``label_emb``,
``input_blocks.N.M``, ``middle_block``, ``output_blocks.N.M``, ``out`` -- the keys found under
``model.diffusion_model.`` in the released checkpoints.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from latent_diffusion.config import ConfigError, UNetConfig
from latent_diffusion.nn.attention import AttentionBlock, SpatialTransformer
from latent_diffusion.nn.layers import (
    Downsample,
    ResBlock,
    Upsample,
    conv_nd,
    normalization,
    timestep_embedding,
    zero_init,
)


class TimestepEmbedSequential(nn.Sequential):
    """A UNet stage: hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def transformer_heads(config: UNetConfig, channels: int) -> tuple[int, int]:
    """(heads, head_dim) of the SpatialTransformer at ``channels``, by the reference's rule.

    ``num_head_channels`` fixes the head width, else ``num_heads`` fixes the count; ``legacy``
    then recomputes the width as ``channels // heads`` (equal unless the division is inexact).
    """
    if config.num_head_channels == -1:
        heads, head_dim = config.num_heads, channels // config.num_heads
    else:
        heads, head_dim = channels // config.num_head_channels, config.num_head_channels
    if heads < 1:
        raise ConfigError(f"UNetConfig: {channels} channels give no attention heads of width {head_dim}")
    if config.legacy:
        head_dim = channels // heads
    if head_dim < 1:
        raise ConfigError(f"UNetConfig: {channels} channels cannot be split into {heads} heads")
    return heads, head_dim


def attention_block_heads(config: UNetConfig, channels: int) -> int:
    """Number of heads of the pre-SD AttentionBlock at ``channels``, by the reference's rule."""
    if config.num_head_channels != -1:
        if channels % config.num_head_channels:
            raise ConfigError(
                f"UNetConfig: {channels} channels are not divisible by num_head_channels={config.num_head_channels}"
            )
        return channels // config.num_head_channels
    if config.legacy:
        return config.num_heads
    # The non-legacy path passes the head width on, and AttentionBlock divides again.
    return channels // (channels // config.num_heads)


def _res_blocks_per_level(config: UNetConfig) -> tuple[int, ...]:
    counts = config.num_res_blocks
    if isinstance(counts, int):
        return (counts,) * len(config.channel_mult)
    if len(counts) != len(config.channel_mult):
        raise ConfigError("UNetConfig: num_res_blocks needs one entry per channel_mult level")
    return tuple(counts)


def _validate(config: UNetConfig) -> None:
    if not config.channel_mult:
        raise ConfigError("UNetConfig: channel_mult must name at least one level")
    if config.dims not in (1, 2, 3):
        raise ConfigError(f"UNetConfig: dims must be 1, 2 or 3, got {config.dims}")
    if config.use_spatial_transformer:
        if config.dims != 2:
            raise ConfigError("UNetConfig: the SpatialTransformer works on 2-D feature maps only (dims=2)")
        levels = [level for level in range(len(config.channel_mult)) if 2**level in config.attention_resolutions]
        if any(config.depth_at(level) < 1 for level in [*levels, None]):
            raise ConfigError(f"UNetConfig: every level with attention needs transformer_depth >= 1, got "
                              f"{config.transformer_depth} (middle {config.depth_at(None)})")
    dsa = config.disable_self_attentions
    if dsa is not None and len(dsa) != len(config.channel_mult):
        raise ConfigError(
            f"UNetConfig: disable_self_attentions has {len(dsa)} entries for {len(config.channel_mult)} levels"
        )
    if config.num_classes == "sequential":
        if not isinstance(config.adm_in_channels, int) or config.adm_in_channels < 1:
            raise ConfigError(f"UNetConfig: adm_in_channels must be a positive int, got {config.adm_in_channels!r}")
    elif config.num_classes is not None and (not isinstance(config.num_classes, int) or config.num_classes < 1):
        raise ConfigError(f"UNetConfig: num_classes must be a positive int, 'sequential' or None, "
                          f"got {config.num_classes!r}")


def _add_control(h: torch.Tensor, skips: list[torch.Tensor],
                 control: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The middle block's output and the skip connections with a ControlNet's residuals added."""
    if len(control) != len(skips) + 1:
        raise ValueError(f"control must hold {len(skips) + 1} residuals (one per input block, then the middle "
                         f"block's), got {len(control)}")
    targets = [*skips, h]
    wrong = [i for i, (c, t) in enumerate(zip(control, targets)) if not _broadcasts_to(c.shape, t.shape)]
    if wrong:
        i = wrong[0]
        raise ValueError(f"control residual {i} is shaped {list(control[i].shape)}, the UNet's feature there "
                         f"{list(targets[i].shape)}: the ControlNet does not fit this UNet")
    added = [t + c.to(t.dtype) for t, c in zip(targets, control)]
    return added[-1], added[:-1]


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


class UNetModel(nn.Module):
    """Timestep- (and optionally class-) conditioned UNet with attention and cross-attention."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        _validate(config)
        self.config = config
        self.cross_attention = config.use_spatial_transformer and config.context_dim is not None
        base = config.model_channels
        self._build_embeddings()
        res_blocks = _res_blocks_per_level(config)
        self.input_blocks = nn.ModuleList()
        skip_channels = []
        for block, channels in self._encoder_blocks():
            self.input_blocks.append(block)
            skip_channels.append(channels)
        downsampling = 2 ** (len(config.channel_mult) - 1)

        self.middle_block = TimestepEmbedSequential(
            self._res_block(channels, channels),
            self._attention(channels, None),
            self._res_block(channels, channels),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(res_blocks[level] + 1):
                layers = [self._res_block(channels + skip_channels.pop(), base * mult)]
                channels = base * mult
                if downsampling in config.attention_resolutions:
                    layers.append(self._attention(channels, level))
                if level and index == res_blocks[level]:
                    layers.append(self._upsample(channels))
                    downsampling //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            zero_init(conv_nd(config.dims, base, config.out_channels, 3, padding=1)),
        )

    def _embed(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
               y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input, timestep (+ label) embedding, context) in the weights' dtype, which a lean or bf16
        model may have changed from the caller's."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        return x.to(dtype), emb, None if context is None else context.to(dtype)

    def _build_embeddings(self) -> None:
        """The timestep MLP and, for class- or ADM-conditioned models, the label embedding."""
        config = self.config
        base = config.model_channels
        self.time_embed_dim = time_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if config.num_classes == "sequential":
            # SDXL's ADM input: a vector (pooled text + size features) through a two-layer MLP.
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)))
        elif config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, time_dim)

    def _encoder_blocks(self) -> Iterator[tuple[TimestepEmbedSequential, int]]:
        """The input blocks in order, each with its output width, built one at a time as they are taken
        (a ControlNet builds its zero convolution after each, in the order its files number them)."""
        config = self.config
        base = config.model_channels
        yield TimestepEmbedSequential(conv_nd(config.dims, config.in_channels, base, 3, padding=1)), base
        res_blocks = _res_blocks_per_level(config)
        channels, downsampling = base, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(res_blocks[level]):
                layers = [self._res_block(channels, base * mult)]
                channels = base * mult
                if downsampling in config.attention_resolutions:
                    layers.append(self._attention(channels, level))
                yield TimestepEmbedSequential(*layers), channels
            if level != len(config.channel_mult) - 1:
                yield TimestepEmbedSequential(self._downsample(channels)), channels
                downsampling *= 2

    def _res_block(self, channels: int, out_channels: int, **resample) -> ResBlock:
        c = self.config
        return ResBlock(
            channels, self.time_embed_dim, c.dropout, out_channels,
            use_scale_shift_norm=c.use_scale_shift_norm, dims=c.dims, **resample,
        )

    def _downsample(self, channels: int) -> nn.Module:
        if self.config.resblock_updown:
            return self._res_block(channels, channels, down=True)
        return Downsample(channels, self.config.conv_resample, self.config.dims, channels)

    def _upsample(self, channels: int) -> nn.Module:
        if self.config.resblock_updown:
            return self._res_block(channels, channels, up=True)
        return Upsample(channels, self.config.conv_resample, self.config.dims, channels)

    def _attention(self, channels: int, level: int | None) -> nn.Module:
        """The attention layer at a level (``None``: the middle block)."""
        c = self.config
        if not c.use_spatial_transformer:
            return AttentionBlock(channels, attention_block_heads(c, channels))
        if level is None:
            disable_self_attn = c.disable_middle_self_attn
        else:
            disable_self_attn = bool(c.disable_self_attentions and c.disable_self_attentions[level])
        heads, head_dim = transformer_heads(c, channels)
        # The reference builds its transformers without dropout whatever the config says.
        return SpatialTransformer(
            channels, heads, head_dim, depth=c.depth_at(level), context_dim=c.context_dim,
            disable_self_attn=disable_self_attn, use_linear=c.use_linear_in_transformer,
            positions=c.transformer_positions,
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict from noisy latents ``x`` [B, C, H, W] at ``timesteps`` [B] (float or int).

        ``context`` [B, L, context_dim] feeds cross-attention; ``y`` holds class ids [B] (or the
        x4 upscaler's noise level) when the config has ``num_classes``, the ADM vector
        [B, adm_in_channels] when it is "sequential" (SDXL). ``control`` holds a ControlNet's
        residuals: one per input block, added to its skip connection, then the middle block's.
        """
        timesteps = self._check_inputs(x, timesteps, context, y)
        h, emb, context = self._embed(x, timesteps, context, y)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h, skips = _add_control(h, skips, control)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)

    def _check_inputs(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        c = self.config
        if x.ndim != c.dims + 2 or x.shape[1] != c.in_channels:
            expected = "[B, %d, %s]" % (c.in_channels, ", ".join("HWD"[: c.dims]))
            raise ValueError(f"UNet input must be shaped {expected}, got {tuple(x.shape)}")
        batch = x.shape[0]
        factor = 2 ** (len(c.channel_mult) - 1)
        spatial = x.shape[2:] if c.dims != 3 else x.shape[3:]
        if any(size % factor for size in spatial):
            raise ValueError(
                f"UNet input spatial size {tuple(x.shape[2:])} must be divisible by {factor} "
                f"({len(c.channel_mult) - 1} downsamplings)"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or shaped [{batch}], got {tuple(timesteps.shape)}")
        if self.cross_attention:
            if context is None:
                raise ValueError(f"this UNet cross-attends: pass context shaped [B, L, {c.context_dim}]")
            if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.context_dim:
                raise ValueError(
                    f"context must be shaped [{batch}, L, {c.context_dim}], got {tuple(context.shape)}"
                )
        elif context is not None and not c.use_spatial_transformer:
            raise ValueError("this UNet has no cross-attention (use_spatial_transformer=False); context must be None")
        elif context is not None:
            raise ValueError("this UNet's transformers have no context_dim; context must be None")
        if c.num_classes is None:
            if y is not None:
                raise ValueError("y (class labels) given, but this UNet is not class-conditional (num_classes=None)")
        elif c.num_classes == "sequential":
            if y is None or y.shape != (batch, c.adm_in_channels) or not y.is_floating_point():
                got = None if y is None else f"{tuple(y.shape)} {y.dtype}"
                raise ValueError(f"this UNet takes an ADM vector: pass y as floats shaped [{batch}, {c.adm_in_channels}], "
                                 f"got {got}")
        else:
            if y is None:
                raise ValueError("this UNet is class-conditional (num_classes set): pass y shaped [B]")
            if y.shape != (batch,) or y.dtype.is_floating_point:
                raise ValueError(f"y must be integer class ids shaped [{batch}], got {tuple(y.shape)} {y.dtype}")
        return timesteps
