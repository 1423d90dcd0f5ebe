"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3): the CPU's exact path on large maps.

Each 2x2 block of outputs comes from the 4x4 input tile around it: the tile and the 3x3 kernel are
each taken to a 4x4 transformed domain, multiplied there element by element (summed over the input
channels: 16 matrix products, one per position in the tile) and brought back. That is 16
multiply-adds per input channel for 4 outputs, where the direct convolution needs 36: SD 1.5's and
its VAE's convolutions on maps of 16x16 and larger run 1.2-1.6x faster on a Xeon's 2 cores (fp32,
oneDNN's packed direct convolution against this, the weight's transform included).

Exact in the sense that matters here: the transforms only add, subtract and halve, and measured
against a float64 convolution the result's error is 3-4x smaller than oneDNN's direct kernel's (6e-7
against 2-3e-6 relative, SD's shapes). The larger tiles of F(4x4, 3x3) would be faster still but their
transforms divide by 6 and 24, with 20x the error (1.3e-5): not taken.

The layer keeps its plain weight (state dicts, LoRA merges and file-mapped pages as without this);
the weight's transform, a matrix product of 9 values into 16, runs on each call: 2% of a call for
320 channels at 64x64, 23% for 1280 at 16x16, where it still leaves the call 1.25x faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F(2x2, 3x3) with interpolation points 0, 1, -1 and infinity: B^T takes a 4-tap input row to the
# transformed domain, G a 3-tap kernel row, A^T the products back to 2 outputs.
_INPUT_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_KERNEL = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_OUTPUT_T = ((1, 1, 1, 0), (0, 1, -1, -1))
TILE, OUT = 4, 2

# Transient buffers of one call stay under about this (the transformed input is 4x the input):
# larger maps are done in bands of tile rows.
_BAND_BYTES = 48 << 20
# Where the direct kernel wins (measured, fp32): maps under 16x16, where a weight read once serves
# too few tiles to pay for its 16/9-size transform (1280 channels at 8x8: 1.2-1.5x slower), and thin
# layers (128 channels at 256x256: 1.3x slower; 256 there: 0.92x).
MIN_PIXELS = 16 * 16
MIN_CHANNELS = 256


def _matrices(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The 2-D transforms as Kronecker products: input [16, 16], kernel [16, 9], output [4, 16]."""
    def kron(rows):
        m = torch.tensor(rows, dtype=torch.float64)
        return torch.kron(m, m).to(dtype=dtype, device=device)
    return kron(_INPUT_T), kron(_KERNEL), kron(_OUTPUT_T)


_CACHE: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _transforms(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    key = (x.dtype, x.device)
    if key not in _CACHE:
        _CACHE[key] = _matrices(x.dtype, x.device)
    return _CACHE[key]


def runs_winograd(layer: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``layer`` on ``x`` is one this module serves, and faster than the direct kernel: a plain
    3x3 convolution (stride 1, padding 1, one group) in fp32 on the CPU, at least 256 channels in and
    out, on a map of 16x16 or more."""
    return (isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (3, 3) and tuple(layer.stride) == (1, 1)
            and tuple(layer.padding) == (1, 1) and tuple(layer.dilation) == (1, 1) and layer.groups == 1
            and layer.padding_mode == "zeros" and layer.weight.dtype == torch.float32 and x.dtype == torch.float32
            and x.device.type == "cpu" and x.dim() == 4
            and min(layer.in_channels, layer.out_channels) >= MIN_CHANNELS
            and x.shape[-2] * x.shape[-1] >= MIN_PIXELS)


def transform_weight(weight: Tensor) -> Tensor:
    """A [O, C, 3, 3] kernel in the transformed domain, [16, O, C]."""
    out_channels, in_channels = weight.shape[:2]
    _, kernel, _ = _transforms(weight)
    return torch.mm(kernel, weight.reshape(-1, 9).t()).view(16, out_channels, in_channels)


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by F(2x2, 3x3); returned channels-last."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    kernel_t = transform_weight(weight)
    tiles_h, tiles_w = -(-height // OUT), -(-width // OUT)
    pixels = x.permute(0, 2, 3, 1)  # [B, H, W, C]: a view where x is channels-last
    out = x.new_empty(batch, tiles_h * OUT, tiles_w * OUT, out_channels)
    band = max(1, _BAND_BYTES // (TILE * TILE * batch * tiles_w * max(channels, out_channels) * x.element_size()))
    for first in range(0, tiles_h, band):
        rows = min(band, tiles_h - first)
        outputs = _band(_padded_rows(pixels, first, rows, tiles_w), kernel_t)
        out[:, first * OUT:(first + rows) * OUT].view(batch, rows, OUT, tiles_w, OUT, -1).copy_(outputs)
    if bias is not None:
        out += bias
    return out[:, :height, :width].permute(0, 3, 1, 2)


def _padded_rows(pixels: Tensor, first: int, rows: int, tiles_w: int) -> Tensor:
    """The input under tile rows ``first`` to ``first + rows``, zero-padded: by 1 for the convolution,
    and up to whole tiles at the right and bottom edges. [B, 2 * rows + 2, 2 * tiles_w + 2, C], contiguous
    (a band at a time: a large map is never copied whole)."""
    height, width = pixels.shape[1:3]
    top, bottom = first * OUT - 1, (first + rows) * OUT + 1  # input rows the band reads, padding included
    inside = pixels[:, max(top, 0):min(bottom, height)]
    return F.pad(inside, (0, 0, 1, tiles_w * OUT + 1 - width, max(-top, 0), max(bottom - height, 0))).contiguous()


def _band(padded: Tensor, kernel_t: Tensor) -> Tensor:
    """One band of tile rows (``padded`` from :func:`_padded_rows`): its output, [B, rows, 2, tiles_w, 2, O]."""
    input_t, _, output_t = _transforms(padded)
    batch, channels = padded.shape[0], padded.shape[-1]
    rows, tiles_w = (padded.shape[1] - 2) // OUT, (padded.shape[2] - 2) // OUT
    s_b, s_h, s_w, _ = padded.stride()
    # [4, 4, B, rows, tiles_w, C]: the 16 positions of every tile, each a plane of tiles x channels.
    tiles = padded.as_strided((TILE, TILE, batch, rows, tiles_w, channels), (s_h, s_w, s_b, OUT * s_h, OUT * s_w, 1))
    count = batch * rows * tiles_w
    transformed = torch.mm(input_t, tiles.reshape(TILE * TILE, -1)).view(TILE * TILE, count, channels)
    products = torch.bmm(transformed, kernel_t.transpose(1, 2))  # [16, tiles, O]
    outputs = torch.mm(output_t, products.view(TILE * TILE, -1))
    return outputs.view(OUT, OUT, batch, rows, tiles_w, -1).permute(2, 3, 0, 4, 1, 5)
