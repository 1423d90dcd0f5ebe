"""VAE decoding and encoding of large images in bands of rows, with the untiled network's result.

At high resolution an autoencoder's memory goes to its activations, not its weights: the SD decoder
at 2048 px makes 4 GiB tensors. Cutting the image into tiles that run through the network on their
own bounds that, but changes the answer: GroupNorm normalises with statistics of the whole image,
and the mid-block attention lets every pixel see every other, so a tile alone computes something
else (9 dB PSNR from the untiled decode with random SD weights, whatever statistics one estimates).

So here the network runs layer by layer over the whole image, and each layer that works on pixels
(a convolution with its GroupNorm and SiLU in front, upsampling, downsampling, the residual add)
runs over bands of rows, each band reading the rows of the previous activation it needs (a one-row
halo for a 3x3 convolution). Hence:

- only the activations between layers exist whole; a band's float32 working set is bounded
  (``band_bytes``), and activations larger than ``exact_bytes`` are stored in float16;
- GroupNorm gets the exact statistics of the whole image: per-channel moments of each band, taken
  as the convolution writes it, merged in float64;
- attention stays global: it runs at the lowest resolution, where PyTorch's fused attention needs
  memory linear in the number of pixels;
- the result is the untiled network's up to float32 rounding (SD decode at 1024 px: 143 dB PSNR),
  plus float16 rounding where an activation is stored in float16.

The layers are read from our ``Encoder``/``Decoder`` modules (their CompVis structure), and their
weights are cast per call, so lean mode's half-precision weights work unchanged.
"""
from __future__ import annotations

import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from latent_diffusion.models.autoencoder import (
    AttnBlock, AutoencoderKL, Decoder, Encoder, Level, MidBlock, ResnetBlock, VQModel,
)
from latent_diffusion.models.distributions import DiagonalGaussianDistribution
from latent_diffusion.nn.attention import attention
from latent_diffusion.nn.packed import plain_weight

# A band's float32 input working tensor. Small bands are faster, not slower: they stay in the CPU's
# caches between the normalisation, the convolution and the store (SD decode at 512 px: 14.6 s with
# 8 MiB bands, 17.6 s with 64 MiB, 14.8 s untiled).
DEFAULT_BAND_BYTES = 8 * 2**20
# Activations up to this size (in float32) are stored in float32: every activation of a 1024 px
# SD decode, so there the result is exact; above it float16 halves them (2048 px: peak 4 GiB).
DEFAULT_EXACT_BYTES = 2**30
_FLOAT16_MAX = torch.finfo(torch.float16).max


class _Affine:
    """A GroupNorm with its statistics fixed: per-sample, per-channel scale and shift."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        self.scale, self.shift = scale[:, :, None, None], shift[:, :, None, None]

    def __call__(self, x: Tensor, silu: bool) -> Tensor:
        x = torch.addcmul(self.shift, x, self.scale)
        return F.silu(x, inplace=True) if silu else x


class _ChannelMoments:
    """Per-channel mean and sum of squared deviations, merged band by band in float64 with the
    parallel-variance formula (Chan et al.); each band's own moments come from ``var_mean``."""

    def __init__(self, batch: int, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(batch, channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, band: Tensor) -> None:
        band_var, band_mean = torch.var_mean(band, dim=(2, 3), unbiased=False)
        n = band.shape[2] * band.shape[3]
        total = self.count + n
        delta = band_mean.double() - self.mean
        self.mean += delta * (n / total)
        self.m2 += band_var.double() * n + delta.square() * (self.count * n / total)
        self.count = total

    def group_mean_var(self, groups: int) -> tuple[Tensor, Tensor]:
        # Channels of a group have equal counts: the group's mean is theirs averaged, and its sum of
        # squared deviations adds each channel's spread about the group mean.
        batch, channels = self.mean.shape
        channel_mean = self.mean.view(batch, groups, channels // groups)
        mean = channel_mean.mean(-1)
        m2 = self.m2.view(batch, groups, -1).sum(-1) + self.count * (channel_mean - mean[..., None]).square().sum(-1)
        return mean, m2 / (self.count * (channels // groups))


def _spans(length: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length, step):
        yield start, min(start + step, length)


class _BandRunner:
    """Runs the autoencoder's layers over whole activations, band by band (see the module docstring)."""

    def __init__(self, compute_dtype: torch.dtype, band_bytes: int, exact_bytes: int, progress: tqdm | None) -> None:
        self.compute = compute_dtype
        self.band_bytes = band_bytes
        self.exact_bytes = exact_bytes
        self.progress = progress
        # Moments of each activation, recorded by the convolution that writes it (from the band in
        # cache, saving a pass over the whole tensor); keyed by id, checked through a weak reference.
        self._moments: dict[int, tuple[weakref.ref, _ChannelMoments]] = {}

    # ------------------------------------------------------------------ storage
    def _empty(self, like: Tensor, channels: int, height: int, width: int) -> Tensor:
        numel = like.shape[0] * channels * height * width
        dtype = self.compute if numel * 4 <= self.exact_bytes else torch.float16
        return torch.empty(like.shape[0], channels, height, width, dtype=dtype, device=like.device)

    def _store(self, out: Tensor, rows: slice, band: Tensor) -> None:
        if out.dtype == torch.float16 and band.dtype != torch.float16:
            peak = band.abs().max().item()
            if not peak <= _FLOAT16_MAX:  # also catches NaN
                raise FloatingPointError(
                    f"an activation of {peak:.3g} does not fit the float16 storage of large activations; "
                    f"pass a larger exact_bytes (now {self.exact_bytes}) to keep it in float32"
                )
        out[:, :, rows] = band

    def _rows_per_band(self, channels: int, width: int) -> int:
        return max(1, self.band_bytes // (4 * channels * width))

    def weights(self, conv: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
        bias = conv.bias.to(self.compute) if conv.bias is not None else None
        return plain_weight(conv).to(self.compute), bias

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    # ------------------------------------------------------------------ layers
    def norm(self, x: Tensor, layer: nn.GroupNorm) -> _Affine:
        """``layer`` with the exact statistics of the whole ``x``."""
        batch, channels, height, width = x.shape
        groups, per_group = layer.num_groups, channels // layer.num_groups
        moments = self._moments.get(id(x))
        if moments is None or moments[0]() is not x:
            # Not recorded while x was written (an attention output, the input): one pass over it.
            moments = (None, _ChannelMoments(batch, channels, x.device))
            for top, bottom in _spans(height, self._rows_per_band(channels, width)):
                moments[1].add(x[:, :, top:bottom].to(self.compute))
        mean, var = moments[1].group_mean_var(groups)
        inv_std = torch.rsqrt(var + layer.eps).repeat_interleave(per_group, dim=1)
        mean = mean.repeat_interleave(per_group, dim=1)
        weight = layer.weight.double() if layer.weight is not None else 1.0
        bias = layer.bias.double() if layer.bias is not None else 0.0
        scale = inv_std * weight
        return _Affine(scale.to(self.compute), (bias - mean * scale).to(self.compute))

    def conv(self, x: Tensor, conv: nn.Conv2d, pre: _Affine | None = None, upsample: bool = False,
             extra_padding: tuple[int, int, int, int] = (0, 0, 0, 0), residual: Tensor | None = None,
             shortcut: nn.Conv2d | None = None, out: Tensor | None = None) -> Tensor:
        """``conv(silu(pre(x)))`` band by band, ``x`` first upsampled 2x (nearest) if ``upsample``.

        ``extra_padding`` (left, right, top, bottom) is zero padding applied before the convolution's
        own; ``residual`` (through the 1x1 ``shortcut`` if given) is added to the result, which may be
        written into ``out`` (the residual itself: each band reads only its own rows of it).
        """
        batch, in_channels, height, width = x.shape
        scale = 2 if upsample else 1
        src_h, src_w = height * scale, width * scale
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        ph, pw = conv.padding
        left, right, top, bottom = pw + extra_padding[0], pw + extra_padding[1], ph + extra_padding[2], ph + extra_padding[3]
        out_h, out_w = (src_h + top + bottom - kh) // sh + 1, (src_w + left + right - kw) // sw + 1
        if out is None:
            out = self._empty(x, conv.out_channels, out_h, out_w)
        weight, bias = self.weights(conv)
        shortcut_weights = self.weights(shortcut) if shortcut is not None else None
        rows = max(1, self._rows_per_band(max(in_channels, conv.out_channels), src_w) // sh)
        moments = _ChannelMoments(batch, conv.out_channels, x.device)
        for out_top, out_bottom in _spans(out_h, rows):
            # Rows of the padded (and upsampled) input this band of outputs reads, in source coordinates.
            first, last = out_top * sh - top, (out_bottom - 1) * sh + kh - top
            lo, hi = max(first, 0), min(last, src_h)
            if upsample:
                band = x[:, :, lo // 2:(hi - 1) // 2 + 1].to(self.compute)
                if pre is not None:
                    band = pre(band, silu=True)
                band = F.interpolate(band, scale_factor=2.0, mode="nearest")
                band = band[:, :, lo - 2 * (lo // 2):][:, :, :hi - lo]
            else:
                band = x[:, :, lo:hi].to(self.compute)
                if pre is not None:
                    band = pre(band, silu=True)
            # Zero rows only at the image's top and bottom; columns through the convolution's own
            # padding where it is symmetric (a copy of the band saved).
            side = left if left == right else 0
            if lo - first or last - hi or left != right:
                band = F.pad(band, (left - side, right - side, lo - first, last - hi))
            result = F.conv2d(band, weight, bias, stride=conv.stride, padding=(0, side))
            if residual is not None:
                skip = residual[:, :, out_top:out_bottom].to(self.compute)
                result += F.conv2d(skip, *shortcut_weights) if shortcut_weights is not None else skip
            self._store(out, slice(out_top, out_bottom), result)
            moments.add(result)
        self._moments = {key: value for key, value in self._moments.items() if value[0]() is not None}
        self._moments[id(out)] = (weakref.ref(out), moments)
        self._tick()
        return out

    def resnet(self, x: Tensor, block: ResnetBlock) -> Tensor:
        h = self.conv(x, block.conv1, pre=self.norm(x, block.norm1))
        # Without a shortcut convolution the block's output overwrites its input in place.
        out = x if block.nin_shortcut is None else None
        return self.conv(h, block.conv2, pre=self.norm(h, block.norm2), residual=x, shortcut=block.nin_shortcut,
                         out=out)

    def attn(self, x: Tensor, block: nn.Module) -> Tensor:
        if not isinstance(block, AttnBlock):  # attn_type "none"
            return x
        batch, channels, height, width = x.shape
        tokens = self.norm(x, block.norm)(x.to(self.compute), silu=False).flatten(2).transpose(1, 2).contiguous()

        def project(conv: nn.Conv2d, inputs: Tensor) -> Tensor:
            weight, bias = self.weights(conv)
            return F.linear(inputs, weight.flatten(1), bias)

        q, k, v = (project(conv, tokens).unsqueeze(1) for conv in (block.q, block.k, block.v))
        del tokens
        out = project(block.proj_out, attention(q, k, v).squeeze(1))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        self._tick()
        return (out + x.to(self.compute)).to(x.dtype)

    def level(self, h: Tensor, level: Level) -> Tensor:
        for index, block in enumerate(level.block):
            h = self.resnet(h, block)
            if level.attn:
                h = self.attn(h, level.attn[index])
        if level.downsample is not None:
            h = self.conv(h, level.downsample.conv, extra_padding=(0, 1, 0, 1))
        if level.upsample is not None:
            h = self.conv(h, level.upsample.conv, upsample=True)
        return h

    def mid(self, h: Tensor, mid: MidBlock) -> Tensor:
        return self.resnet(self.attn(self.resnet(h, mid.block_1), mid.attn_1), mid.block_2)

    def output(self, h: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d) -> Tensor:
        out = torch.empty(h.shape[0], conv.out_channels, h.shape[2], h.shape[3], dtype=self.compute, device=h.device)
        return self.conv(h, conv, pre=self.norm(h, norm), out=out)

    def decoder(self, decoder: Decoder, z: Tensor) -> Tensor:
        h = self.mid(self.conv(z, decoder.conv_in), decoder.mid)
        for level in reversed(decoder.up):
            h = self.level(h, level)
        return self.output(h, decoder.norm_out, decoder.conv_out)

    def encoder(self, encoder: Encoder, x: Tensor) -> Tensor:
        h = self.conv(x, encoder.conv_in)
        for level in encoder.down:
            h = self.level(h, level)
        return self.output(self.mid(h, encoder.mid), encoder.norm_out, encoder.conv_out)


def _layer_count(network: nn.Module) -> int:
    """How many steps a banded run of ``network`` takes: one per convolution or attention block."""
    steps = 0
    for name, module in network.named_modules():
        if isinstance(module, AttnBlock):
            steps += 1
        elif isinstance(module, nn.Conv2d) and not name.endswith("nin_shortcut") and ".attn" not in name:
            steps += 1
    return steps


def _check(vae: nn.Module, band_bytes: int, exact_bytes: int) -> None:
    if not isinstance(vae, (AutoencoderKL, VQModel)):
        raise TypeError(f"banded VAE coding needs our AutoencoderKL or VQModel, got {type(vae).__name__}")
    if band_bytes < 1 or exact_bytes < 0:
        raise ValueError(f"band_bytes must be positive and exact_bytes non-negative; got {band_bytes}, {exact_bytes}")


def _runner(x: Tensor, network: nn.Module, band_bytes: int, exact_bytes: int, progress: bool, what: str):
    compute = x.dtype if x.is_cuda else torch.float32  # CPUs compute half precision slowly
    bar = tqdm(total=_layer_count(network), desc=what, unit="layer", disable=not progress, leave=False)
    return _BandRunner(compute, band_bytes, exact_bytes, bar), bar


@torch.no_grad()
def decode_tiled(vae: nn.Module, z: Tensor, band_bytes: int = DEFAULT_BAND_BYTES,
                 exact_bytes: int = DEFAULT_EXACT_BYTES, progress: bool = False) -> Tensor:
    """``vae.decode(z)`` (unscaled latents, as decode takes) computed in bands of rows; see the module docstring."""
    _check(vae, band_bytes, exact_bytes)
    vae._check_latent(z)
    if isinstance(vae, VQModel):
        z = vae.quantize(z).z_q
    runner, bar = _runner(z, vae.decoder, band_bytes, exact_bytes, progress, "VAE decode")
    with bar:
        h = F.conv2d(z.to(runner.compute), *runner.weights(vae.post_quant_conv))
        return runner.decoder(vae.decoder, h).to(z.dtype)


@torch.no_grad()
def encode_tiled(vae: nn.Module, x: Tensor, band_bytes: int = DEFAULT_BAND_BYTES,
                 exact_bytes: int = DEFAULT_EXACT_BYTES,
                 progress: bool = False) -> Tensor | DiagonalGaussianDistribution:
    """``vae.encode(x)`` computed in bands of rows: a KL posterior, or the VQ model's pre-quantisation latent."""
    _check(vae, band_bytes, exact_bytes)
    vae._check_image(x)
    runner, bar = _runner(x, vae.encoder, band_bytes, exact_bytes, progress, "VAE encode")
    with bar:
        moments = F.conv2d(runner.encoder(vae.encoder, x), *runner.weights(vae.quant_conv)).to(x.dtype)
    return DiagonalGaussianDistribution(moments) if isinstance(vae, AutoencoderKL) else moments
