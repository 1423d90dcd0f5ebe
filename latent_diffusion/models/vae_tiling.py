"""Tiled VAE decoding and encoding for images larger than memory allows in one piece.

Each tile is run through the network on its own and the tiles are blended with linear ramps across
their overlaps. Two things would otherwise show as seams: the convolutions' zero padding at a tile's
border (the overlap, discarded by the ramps, takes it), and GroupNorm, whose per-group statistics a
tile would compute over itself only. So the statistics are estimated once for the whole image, from
one pass over the image (or latent) reduced to a single tile's size, and every tile is normalised
with them: the "fixed statistics" of multi-tile VAE decoders (A1111's Tiled VAE does the same).
Normalising every tile the same way makes the tiles agree on brightness and colour.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.models.distributions import DiagonalGaussianDistribution

DEFAULT_LATENT_TILE = 64  # 512 px for the SD VAE: its decoder's peak at this size is about 2.5 GiB
DEFAULT_LATENT_OVERLAP = 16


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length``, neighbours overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _blend_weight(size: int, overlap_before: int, overlap_after: int, device) -> Tensor:
    """1-D blending weight of one tile: 0 at an interior border, a short ramp at the overlap's centre, 1 inside.

    The outer part of an overlap is where a tile's convolutions saw zero padding instead of the
    neighbour's content, so it is left to the neighbour; the two ramps of a pair mirror each other
    and sum to one.
    """
    weight = torch.ones(size, device=device)
    for overlap, side in ((overlap_before, 1), (overlap_after, -1)):
        if not overlap:
            continue
        ramp_width = max(2, overlap // 4)
        margin = (overlap - ramp_width) // 2
        ramp = torch.linspace(0, 1, ramp_width + 2, device=device)[1:-1]
        profile = torch.cat([torch.zeros(margin, device=device), ramp])
        if side == 1:
            weight[:len(profile)] = profile
        else:
            weight[size - len(profile):] = profile.flip(0)
    return weight


def _overlaps(starts: list[int], tile: int) -> list[tuple[int, int]]:
    """(overlap with the previous tile, overlap with the next) for each start, in input units."""
    result = []
    for index, start in enumerate(starts):
        before = starts[index - 1] + tile - start if index > 0 else 0
        after = start + tile - starts[index + 1] if index + 1 < len(starts) else 0
        result.append((before, after))
    return result


class _GroupNormStatistics:
    """Records each GroupNorm's per-group mean and variance in one pass, then normalises with them."""

    def __init__(self, network: nn.Module) -> None:
        self.layers = [m for m in network.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[int, tuple[Tensor, Tensor]] = {}

    @contextlib.contextmanager
    def _patched(self, make_forward: Callable[[nn.GroupNorm], Callable[[Tensor], Tensor]]) -> Iterator[None]:
        for layer in self.layers:
            layer.forward = make_forward(layer)  # instance attribute shadows the class method
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def recording(self):
        def make_forward(layer: nn.GroupNorm):
            def forward(x: Tensor) -> Tensor:
                grouped = x.float().reshape(x.shape[0], layer.num_groups, -1)
                var, mean = torch.var_mean(grouped, dim=2, unbiased=False)
                self.stats[id(layer)] = (mean, var)
                return F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
            return forward

        return self._patched(make_forward)

    def applying(self):
        def make_forward(layer: nn.GroupNorm):
            mean, var = self.stats[id(layer)]
            # Per-channel scale and shift equal to GroupNorm with the recorded statistics.
            per_channel = layer.num_channels // layer.num_groups
            inv_std = torch.rsqrt(var + layer.eps).repeat_interleave(per_channel, dim=1)
            mean_c = mean.repeat_interleave(per_channel, dim=1)
            scale = inv_std * (layer.weight.float() if layer.weight is not None else 1.0)
            shift = -mean_c * scale + (layer.bias.float() if layer.bias is not None else 0.0)

            def forward(x: Tensor) -> Tensor:
                return x * scale[:, :, None, None].to(x.dtype) + shift[:, :, None, None].to(x.dtype)
            return forward

        return self._patched(make_forward)


def _reduced(x: Tensor, tile: int) -> Tensor:
    """``x`` shrunk to the area of one tile, keeping its aspect ratio (area averaging keeps the content's mean)."""
    height, width = x.shape[-2:]
    factor = math.sqrt(height * width) / tile
    if factor <= 1:
        return x
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)


def _run_tiled(network: Callable[[Tensor], Tensor], statistics_network: nn.Module, x: Tensor, tile: int,
               overlap: int, scale: float, out_channels: int) -> Tensor:
    """Apply a fully convolutional ``network`` tile by tile; output sides are ``scale`` times the input's."""
    batch, _, height, width = x.shape
    statistics = _GroupNormStatistics(statistics_network)
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    row_overlaps, col_overlaps = _overlaps(rows, tile), _overlaps(cols, tile)
    out_h, out_w = round(height * scale), round(width * scale)
    out = torch.zeros(batch, out_channels, out_h, out_w, dtype=torch.float32, device=x.device)
    total = torch.zeros(1, 1, out_h, out_w, dtype=torch.float32, device=x.device)
    for index in range(batch):
        item = x[index:index + 1]
        with statistics.recording():
            network(_reduced(item, tile))
        with statistics.applying():
            for top, (before_y, after_y) in zip(rows, row_overlaps):
                for left, (before_x, after_x) in zip(cols, col_overlaps):
                    piece = network(item[:, :, top:top + tile, left:left + tile]).float()
                    ph, pw = piece.shape[-2:]
                    wy = _blend_weight(ph, round(before_y * scale), round(after_y * scale), x.device)
                    wx = _blend_weight(pw, round(before_x * scale), round(after_x * scale), x.device)
                    weight = wy[:, None] * wx[None, :]
                    y0, x0 = round(top * scale), round(left * scale)
                    out[index:index + 1, :, y0:y0 + ph, x0:x0 + pw] += piece * weight
                    if index == 0:
                        total[:, :, y0:y0 + ph, x0:x0 + pw] += weight
    return out.div_(total).to(x.dtype)


def _check_tiling(tile: int, overlap: int, multiple: int) -> None:
    if tile < 1 or tile % multiple:
        raise ValueError(f"tile size must be a positive multiple of {multiple}, got {tile}")
    if not 0 <= overlap < tile or overlap % multiple:
        raise ValueError(f"tile overlap must be a multiple of {multiple} in [0, tile size), got {overlap}")


def decode_tiled(vae: nn.Module, z: Tensor, tile: int = DEFAULT_LATENT_TILE,
                 overlap: int = DEFAULT_LATENT_OVERLAP) -> Tensor:
    """``vae.decode(z)`` in overlapping latent tiles of ``tile`` x ``tile`` (unscaled latents, as decode takes)."""
    _check_tiling(tile, overlap, 1)
    if max(z.shape[-2:]) <= tile:
        return vae.decode(z)
    vae._check_latent(z)
    factor = vae.downsampling_factor

    def network(latent: Tensor) -> Tensor:
        return vae.decode(latent)

    return _run_tiled(network, vae.decoder, z, tile, overlap, factor, vae.config.out_ch)


def encode_tiled(vae: nn.Module, x: Tensor, tile: int | None = None,
                 overlap: int | None = None) -> Tensor | DiagonalGaussianDistribution:
    """``vae.encode(x)`` in overlapping image tiles (sizes in pixels; default 8x the latent defaults)."""
    factor = vae.downsampling_factor
    tile = DEFAULT_LATENT_TILE * factor if tile is None else tile
    overlap = DEFAULT_LATENT_OVERLAP * factor if overlap is None else overlap
    _check_tiling(tile, overlap, factor)
    if max(x.shape[-2:]) <= tile:
        return vae.encode(x)
    vae._check_image(x)
    kl = isinstance(vae, AutoencoderKL)

    def network(pixels: Tensor) -> Tensor:
        result = vae.encode(pixels)
        return result.parameters if isinstance(result, DiagonalGaussianDistribution) else result

    channels = 2 * vae.config.embed_dim if kl else vae.config.embed_dim
    moments = _run_tiled(network, vae.encoder, x, tile, overlap, 1 / factor, channels)
    return DiagonalGaussianDistribution(moments) if kl else moments
