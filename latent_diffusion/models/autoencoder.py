"""First-stage autoencoders of latent diffusion: the KL-regularised VAE and the VQ-regularised VQGAN.

Encoder and decoder follow CompVis ``ldm/modules/diffusionmodules/model.py`` (Rombach et al. 2022,
Sec. 3.1 and App. G) module for module, so that the original checkpoints' state-dict keys
(``encoder.down.0.block.0.norm1.weight``, ``decoder.up.3.upsample.conv.weight``, ``quant_conv``,
``quantize.embedding.weight`` ...) load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.config import AutoencoderConfig
from latent_diffusion.models.distributions import DiagonalGaussianDistribution
from latent_diffusion.nn.attention import attention
from latent_diffusion.nn.packed import plain_weight
from latent_diffusion.models.quantize import VectorQuantizer

NORM_GROUPS = 32


def group_norm(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    """The autoencoder's normalisation: 32 groups by default, eps 1e-6 (not the UNet's 1e-5)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without timestep input; 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = NORM_GROUPS) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place activations and residual add on freshly produced tensors: autograd needs neither
        # GroupNorm's nor the convolution's output, and at 1024 px each avoided copy is 0.5 GB.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-convolution projections."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # Pixels as tokens (B, H*W, C): the 1x1 convolutions become linear maps over channels and q,
        # k, v come out with contiguous channels, which the fused attention kernels require (with a
        # strided head dimension PyTorch falls back to the path that materialises the (H*W)^2
        # weights: 1 GiB for the 128x128 latent of a 1024 px image).
        tokens = self.norm(x).flatten(2).transpose(1, 2).contiguous()

        def project(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
            return F.linear(inputs, plain_weight(conv).flatten(1), conv.bias)

        q, k, v = (project(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))
        # One head of width C; SDPA's default scale 1/sqrt(C) is the reference's.
        out = project(self.proj_out, attention(q, k, v).squeeze(1))
        # x first, so that the sum takes x's contiguous NCHW layout rather than the tokens' one.
        return x + out.transpose(1, 2).view(batch, channels, height, width)


def make_attention(channels: int, attn_type: str, groups: int = NORM_GROUPS) -> nn.Module:
    """The attention layer named by ``attn_type``; "none" keeps the slot but has no weights."""
    if attn_type == "vanilla":
        return AttnBlock(channels, groups)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"unknown attn_type {attn_type!r}; expected 'vanilla' or 'none'")


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with the reference's asymmetric (right/bottom) zero padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks (each optionally followed by
    attention), then the change of resolution to the next level, if any."""

    def __init__(
        self,
        widths: list[tuple[int, int]],
        attention: bool,
        attn_type: str,
        dropout: float,
        resample: str | None = None,
        groups: int = NORM_GROUPS,
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout, groups) for i, o in widths)
        self.attn = nn.ModuleList(make_attention(o, attn_type, groups) for _, o in widths if attention)
        channels = widths[-1][1]
        # Attribute names are the checkpoint's: encoder levels own a "downsample", decoder levels
        # an "upsample".
        self.downsample = Downsample(channels) if resample == "down" else None
        self.upsample = Upsample(channels) if resample == "up" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[index](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, attn_type: str, dropout: float, groups: int = NORM_GROUPS) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = make_attention(channels, attn_type, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _check_widths(config: AutoencoderConfig) -> None:
    if not config.ch_mult:
        raise ValueError("AutoencoderConfig.ch_mult must name at least one level")
    bad = [config.ch * m for m in config.ch_mult if (config.ch * m) % config.norm_groups]
    if bad:
        raise ValueError(
            f"autoencoder widths ch*ch_mult must be multiples of norm_groups={config.norm_groups}; got {bad}"
        )


class Encoder(nn.Module):
    """Image -> latent moments; ``2 * z_channels`` outputs when ``double_z`` (mean and log-variance)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        _check_widths(config)
        c = config
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.ch
        # Attention placement is decided from the nominal training resolution, as in the reference.
        resolution = c.resolution
        for index, mult in enumerate(c.ch_mult):
            block_out = c.ch * mult
            widths = [(block_in, block_out)] + [(block_out, block_out)] * (c.num_res_blocks - 1)
            last = index == len(c.ch_mult) - 1
            attention = resolution in c.attn_resolutions
            self.down.append(Level(widths, attention, c.attn_type, c.dropout, None if last else "down", c.norm_groups))
            resolution //= 2
            block_in = block_out
        self.mid = MidBlock(block_in, c.attn_type, c.dropout, c.norm_groups)
        self.norm_out = group_norm(block_in, c.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent (z_channels) -> image; ``num_res_blocks + 1`` blocks per level, ``up[0]`` is full resolution."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        _check_widths(config)
        c = config
        block_in = c.ch * c.ch_mult[-1]
        resolution = c.resolution // 2 ** (len(c.ch_mult) - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, c.attn_type, c.dropout, c.norm_groups)
        levels: list[Level] = []
        for index in reversed(range(len(c.ch_mult))):
            block_out = c.ch * c.ch_mult[index]
            widths = [(block_in, block_out)] + [(block_out, block_out)] * c.num_res_blocks
            attention = resolution in c.attn_resolutions
            levels.append(Level(widths, attention, c.attn_type, c.dropout, "up" if index != 0 else None, c.norm_groups))
            resolution *= 2
            block_in = block_out
        # Indexed by level like the encoder (up[0] = finest), though run from the coarsest.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(block_in, c.norm_groups)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class _FirstStage(nn.Module):
    """What the KL and VQ autoencoders share: encoder, decoder, shape checks."""

    kind: str

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(
                f"{type(self).__name__} needs an AutoencoderConfig with kind={self.kind!r}; got {config.kind!r}"
            )
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output weight, against which the GAN loss balances its gradient norm."""
        return self.decoder.conv_out.weight

    def _check_image(self, x: torch.Tensor) -> None:
        c, f = self.config, self.downsampling_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"{type(self).__name__}.encode expects images (batch, {c.in_channels}, height, width); "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"{type(self).__name__}.encode: height and width must be multiples of the downsampling "
                f"factor {f}; got {x.shape[2]}x{x.shape[3]}"
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"{type(self).__name__}.decode expects latents (batch, {self.config.embed_dim}, height, "
                f"width); got shape {tuple(z.shape)}"
            )


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder (the Stable Diffusion VAE): images <-> diagonal-Gaussian latents."""

    kind = "kl"

    def __init__(self, config: AutoencoderConfig) -> None:
        if not config.double_z:
            raise ValueError("AutoencoderKL needs double_z=True: the encoder must emit mean and log-variance")
        super().__init__(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior q(z | x) for images ``x`` in [-1, 1]."""
        self._check_image(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image (roughly in [-1, 1]) from latent ``z`` (unscaled: divide by the scale factor first)."""
        self._check_latent(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction and posterior, for training; decodes a sample or the mode of q(z | x)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(_FirstStage):
    """VQ-regularised autoencoder; like CompVis ``VQModelInterface``, encode stops before quantisation."""

    kind = "vq"

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(
            config.n_embed,
            config.embed_dim,
            beta=config.beta,
            remap=config.remap,
            sane_index_shape=config.sane_index_shape,
            legacy=config.legacy,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent; the diffusion model works on this, and decode quantises it."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Image from a latent, snapping it to the codebook first unless ``force_not_quantize``."""
        self._check_latent(h)
        quant = h if force_not_quantize else self.quantize(h).z_q
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Image from code indices of shape (batch, height, width)."""
        if indices.ndim != 3:
            raise ValueError(
                f"VQModel.decode_code expects indices (batch, height, width); got {tuple(indices.shape)}"
            )
        codes = self.quantize.get_codebook_entry(indices.reshape(-1), (*indices.shape, self.config.embed_dim))
        return self.decode(codes, force_not_quantize=True)

    def forward(self, x: torch.Tensor, return_pred_indices: bool = False) -> tuple[torch.Tensor, ...]:
        """(reconstruction, codebook loss[, code indices]) through the codebook, as CompVis VQModel."""
        quantized = self.quantize(self.encode(x))
        reconstruction = self.decoder(self.post_quant_conv(quantized.z_q))
        if return_pred_indices:
            return reconstruction, quantized.loss, quantized.info.indices
        return reconstruction, quantized.loss
