"""Packed weights: the CPU's exact fp32 path, with convolution and linear weights laid out once.

In eager mode oneDNN reorders every convolution weight from PyTorch's plain OIHW layout into its
blocked one on every call, and converts the activations to and from its blocked layout around
every convolution. For the UNet's deep levels, where a 1280-channel weight meets an 8x8 or 4x4
feature map, that reorder costs more than the convolution itself (SD 1.5 at 32x32 latents: the
convolutions take 2.1 s a step eager, 1.0 s packed). Packing reorders each weight once, and the
packed convolution keeps activations channels-last, which oneDNN reads without converting them.
The arithmetic is the same kernels' in the same precision: outputs differ from eager by float
rounding only (about 1e-5 relative for SD's UNet).

Where a 3x3 convolution's weight is far larger than its feature map (SD's 1280-channel levels at
8x8 and 4x4), oneDNN's convolution kernels read the weight at a third of the memory's speed; such a
layer is packed as a linear map of each output pixel's 3x3 neighbourhood instead (the neighbourhoods
gathered into rows first, a copy of a few hundred KB): 1.2-1.6x faster there, the same products.
On maps of 16x16 and more, fp32 3x3 convolutions of 256 channels and more are not packed at all:
they run by Winograd's algorithm from their plain weights (nn/winograd.py), 1.2-1.6x faster.

A layer is packed on its first call, and its plain weight's storage is then given up, so the
model takes no more memory than before; ``state_dict()`` still returns plain weights, and
:meth:`PackedWeights.unpacked` brings them back for code that changes them (LoRA merges).
Inference only: a packed layer refuses to run with autograd on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latent_diffusion.checkpoints.io import release_file_pages
from latent_diffusion.nn import cpu_heap, winograd

# oneDNN picks the packed layout from a nominal input; 3x3 convolutions and linear layers so packed
# run at the same speed at any actual size (measured; 1x1 convolutions do not, see _pack; nor do
# strided ones, see _nominal_input).
_NOMINAL_SIDE = 32
_NOMINAL_ROWS = 128
# Convolutions this weight-bound run as linear maps of neighbourhood rows (see _runs_as_rows).
_ROWS_MIN_TAPS = 1280 * 3 * 3
_ROWS_MAX_PIXELS = 8 * 8
# bf16 is packed for bf16 mode (nn/bf16.py), where the UNet's weights are bf16 and the rest fp32.
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(device: torch.device | str) -> bool:
    """Whether this PyTorch build can pack weights for ``device`` (CPU builds with oneDNN)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def is_packed(layer: nn.Module) -> bool:
    """Whether ``layer`` holds its weight packed now."""
    return getattr(layer, "_packed_weight", None) is not None


def runs_packed(layer: nn.Module) -> bool:
    """Whether ``layer`` is one of a :class:`PackedWeights`' layers (packed now or on its next call)."""
    return hasattr(layer, "_packed_weight")


def plain_weight(layer: nn.Module) -> Tensor:
    """``layer.weight`` in PyTorch's layout, packed or not (for code that reads weights itself)."""
    packed = getattr(layer, "_packed_weight", None)
    return layer.weight if packed is None else _dense(layer)


def _packable(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dtype not in PACKED_DTYPES or weight.device.type != "cpu":
        return False
    if type(layer) is nn.Linear:
        return True
    return (type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))


def _pointwise(layer: nn.Module) -> bool:
    """A 1x1 convolution: a linear map of each pixel's channels."""
    return (isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
            and tuple(layer.padding) == (0, 0) and layer.groups == 1)


def _plain_shape(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)


def _nominal_input(layer: nn.Conv2d, first_input: Tensor | None) -> list[int]:
    """The input shape a convolution's weight is packed for. A strided convolution is packed for the
    size of its first input: its kernels want another layout for small outputs (SD's last
    downsampling at 256 px, 8x8 in and 4x4 out, runs 4x slower packed for 32x32, its weight
    reordered on every call; packed for 8x8 it is 2x slower at 16x16). A pipeline calls each one at a
    single size per image size, so the first image's size is the one to serve fastest."""
    side = [_NOMINAL_SIDE, _NOMINAL_SIDE]
    if first_input is not None and tuple(layer.stride) != (1, 1):
        side = list(first_input.shape[-2:])
    return [1, layer.in_channels, *side]


def _runs_as_rows(layer: nn.Conv2d, first_input: Tensor) -> bool:
    """Whether a convolution is served best as a linear map of neighbourhood rows (see the module's
    docstring): weight-bound, at least 11520 input taps (1280 channels x 3x3) on a map of at most
    8x8 pixels. Measured against the packed convolution, fp32 and bf16 alike: 0.6-0.85x the time at 4x4
    and 8x8 for 1280 and more channels, 0.74-0.91x for 1920 and 1280 into 640; even at 16x16 (0.93-1.05x),
    so a layer decided at a small first size keeps up at twice it; slower at 32x32 (1.2x) and with
    fewer taps (960 into 640 at 8x8: 0.99-1.13x)."""
    taps = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return (layer.groups == 1 and tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and taps >= _ROWS_MIN_TAPS and first_input.shape[-2] * first_input.shape[-1] <= _ROWS_MAX_PIXELS)


def _rows_conv(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """The convolution of channels-last ``x`` (stride 1, no dilation) as a product of rows: each output
    pixel's receptive field one row, [B * H' * W', kh * kw * C], in the order of :func:`_rows_weight`'s
    columns."""
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [B, H + 2ph, W + 2pw, C]
    windows = padded.unfold(1, kh, 1).unfold(2, kw, 1)  # [B, H', W', C, kh, kw]
    batch, height, width = windows.shape[:3]
    rows = windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[1])
    out = torch.ops.mkldnn._linear_pointwise(rows, layer._packed_weight, layer.bias, "none", [], "")
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def _rows_weight(weight: Tensor) -> Tensor:
    """A [O, C, kh, kw] convolution weight as the [O, kh * kw * C] matrix the rows are multiplied by."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _pack(weight: Tensor, layer: nn.Module, nominal: list[int] | None) -> Tensor:
    # A 1x1 convolution is packed as a linear layer: oneDNN's 1x1 convolution kernels want another
    # weight layout for each feature-map size (one packed for 32x32 runs 20-90x slower at 4x4,
    # reordering its weight on every call), its linear kernels one for all.
    if isinstance(layer, nn.Linear) or _pointwise(layer):
        return torch.ops.mkldnn._reorder_linear_weight(weight.flatten(1), _NOMINAL_ROWS)
    if getattr(layer, "_packed_as_rows", False):
        return torch.ops.mkldnn._reorder_linear_weight(_rows_weight(weight).contiguous(), _NOMINAL_ROWS)
    return torch.ops.mkldnn._reorder_convolution_weight(weight, list(layer.padding), list(layer.stride),
                                                        list(layer.dilation), layer.groups, nominal)


def _dense(layer: nn.Module) -> Tensor:
    packed = layer._packed_weight
    if isinstance(packed, tuple):  # a gated projection's halves (packed_geglu)
        return torch.cat([half.to_dense() for half in packed]).view(_plain_shape(layer))
    if getattr(layer, "_packed_as_rows", False):
        out_channels, in_channels, kh, kw = _plain_shape(layer)
        rows = packed.to_dense().view(out_channels, kh, kw, in_channels)
        return rows.permute(0, 3, 1, 2).contiguous()
    return packed.to_dense().view(_plain_shape(layer))


def _runs_plain(layer: nn.Module, x: Tensor) -> bool:
    """Whether this call must run the layer's own forward: when a gradient is asked of it (a packed
    layer refuses that), or when something else manages the weight now (lean mode's hooks put an
    upcast copy in its place; a conversion to another dtype)."""
    weight = layer._parameters.get("weight")
    managed = (weight is not layer._packed_parameter or weight.dtype not in PACKED_DTYPES
               or weight.device.type != "cpu")
    wants_gradient = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if wants_gradient and is_packed(layer):
        raise RuntimeError("packed weights are for inference: no gradients through them (run under "
                           "torch.no_grad(), or unpack them first)")
    return managed or wants_gradient


def _packed_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    if _runs_plain(layer, x):
        return nn.Linear.forward(layer, x)
    _pack_layer(layer)
    x = x.to(layer.weight.dtype)
    if isinstance(layer._packed_weight, tuple):  # a gated projection called as a plain one
        halves = zip(layer._packed_weight, _bias_halves(layer))
        return torch.cat([torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "") for w, b in halves], -1)
    return torch.ops.mkldnn._linear_pointwise(x, layer._packed_weight, layer.bias, "none", [], "")


def _bias_halves(layer: nn.Linear) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if layer.bias is None else tuple(layer.bias.chunk(2))


def packed_geglu(layer: nn.Linear, x: Tensor) -> Tensor | None:
    """``value * gelu(gate)`` for the gated projection ``layer`` (value outputs first, then gate), as
    GEGLU computes it, or None where ``layer`` does not run packed (the caller computes it then).

    Packed as two halves, the gate's product applies the GELU and the value's multiplies by the gate
    inside oneDNN's kernels: no passes of their own over the 8x-wide activations (bf16 mode: 1.1 ms of a
    2.9 ms projection at SD 1.5's 32x32 level). Exact: the products are the same, in the same precision."""
    if not runs_packed(layer) or _runs_plain(layer, x):
        return None
    if is_packed(layer) and not isinstance(layer._packed_weight, tuple):
        return None  # packed whole by an earlier plain call
    _pack_layer(layer, gated=True)
    x = x.to(layer.weight.dtype)
    (value, gate), (value_bias, gate_bias) = layer._packed_weight, _bias_halves(layer)
    gelu_gate = torch.ops.mkldnn._linear_pointwise(x, gate, gate_bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gelu_gate, value, value_bias, "mul")


def _packed_conv(layer: nn.Conv2d, x: Tensor) -> Tensor:
    if _runs_plain(layer, x):
        return nn.Conv2d.forward(layer, x)
    # A layer still unpacked (its plain weight at hand) takes Winograd's path where that is faster;
    # once packed for a call at another size (a smaller map), it stays packed.
    if not is_packed(layer) and winograd.runs_winograd(layer, x):
        return winograd.conv3x3(x, layer.weight, layer.bias)
    _pack_layer(layer, x)
    # Channels-last in, channels-last out: oneDNN's convolutions read that layout as it is. An input
    # in another dtype is cast as autocast would (bf16 mode's fp32 latents).
    x = x.to(layer.weight.dtype).contiguous(memory_format=torch.channels_last)
    if _pointwise(layer):  # on the [B, H, W, C] view, which channels-last memory already is
        pixels = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1), layer._packed_weight, layer.bias,
                                                    "none", [], "")
        return pixels.permute(0, 3, 1, 2)
    if getattr(layer, "_packed_as_rows", False):
        return _rows_conv(layer, x)
    return torch.ops.mkldnn._convolution_pointwise(x, layer._packed_weight, layer.bias, list(layer.padding),
                                                   list(layer.stride), list(layer.dilation), layer.groups,
                                                   "none", [], "")


def _plain_in_state_dict(layer: nn.Module, state: dict, prefix: str, metadata) -> None:
    if is_packed(layer):
        state[prefix + "weight"] = _dense(layer)


def _pack_layer(layer: nn.Module, first_input: Tensor | None = None, gated: bool = False) -> None:
    """Packs ``layer``'s weight (for ``first_input``'s size where that matters, as two halves for a
    gated projection; after an unpacking, as it was packed before)."""
    if is_packed(layer):
        return
    plain = layer.weight.detach()
    if isinstance(layer, nn.Conv2d) and not _pointwise(layer):
        if first_input is not None or getattr(layer, "_packed_nominal", None) is None:
            layer._packed_nominal = _nominal_input(layer, first_input)
        if first_input is not None:
            layer._packed_as_rows = _runs_as_rows(layer, first_input)
    layer._packed_gated = gated or getattr(layer, "_packed_gated", False)
    with cpu_heap.own_pages():  # kept for the model's life: not among a step's activations
        if layer._packed_gated:
            layer._packed_weight = tuple(_pack(half, layer, None) for half in plain.chunk(2))
        else:
            layer._packed_weight = _pack(plain, layer, getattr(layer, "_packed_nominal", None))
    layer.weight.data = plain.new_empty(0)  # the packed copy holds the values now
    release_file_pages(plain)  # a weight mapped from its file would otherwise stay resident too


def _unpack_layer(layer: nn.Module) -> None:
    layer.weight.data = _dense(layer)
    layer._packed_weight = None


class PackedWeights:
    """The eligible layers of ``modules`` (fp32 or bf16 ``nn.Linear`` and ``nn.Conv2d`` on the CPU) run
    packed, each packed on its first call: a layer never called (a VAE encoder in txt2img) stays
    as loaded, file-mapped pages included, and takes no memory."""

    def __init__(self, *modules: nn.Module) -> None:
        self.layers = [layer for module in modules for layer in module.modules() if _packable(layer)]
        for layer in self.layers:
            layer.register_state_dict_post_hook(_plain_in_state_dict)
            layer._packed_weight = None
            layer.weight.requires_grad_(False)  # frozen for inference, so calls need no torch.no_grad()
            # The Parameter packed (see _runs_plain); set past nn.Module, which would register it again.
            layer.__dict__["_packed_parameter"] = layer.weight
            forward = _packed_linear if isinstance(layer, nn.Linear) else _packed_conv
            layer.forward = forward.__get__(layer)

    @property
    def packed_layers(self) -> list[nn.Module]:
        return [layer for layer in self.layers if is_packed(layer)]


@contextmanager
def unpacked(*modules: nn.Module) -> Iterator[None]:
    """Plain weights in ``modules``' packed layers inside (to read or change them, not to run the
    layers); the layers are packed again after, with any changes."""
    packed = [layer for module in modules for layer in module.modules() if is_packed(layer)]
    for layer in packed:
        _unpack_layer(layer)
    try:
        yield
    finally:
        for layer in packed:
            _pack_layer(layer)
