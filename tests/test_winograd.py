"""The CPU's exact convolution paths for SD-size layers (nn/winograd.py; nn/packed.py's rows), against
float64 convolutions and the plain layers they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latent_diffusion.nn import winograd
from latent_diffusion.nn.packed import PackedWeights, is_packed, packing_available, unpacked
from conftest import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def _float64_conv(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


@pytest.mark.parametrize("size", [(6, 8), (7, 10), (1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_convolution_is_as_close_to_float64_as_the_direct_one(size, bias, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 8, 3, 3, generator=generator) / 8
    b = torch.randn(12, generator=generator) if bias else None
    x = torch.randn(2, 8, *size, generator=generator)
    expected = _float64_conv(x, weight, b)
    direct_error = (F.conv2d(x, weight, b, padding=1).double() - expected).abs().max().item()
    monkeypatch.setattr(winograd, "_BAND_BYTES", 1)  # one tile row a band: the bands' seams are tested too
    for layout in (torch.contiguous_format, torch.channels_last):
        ours = winograd.conv3x3(x.contiguous(memory_format=layout), weight, b)
        assert ours.shape == expected.shape and ours.dtype == torch.float32
        assert (ours.double() - expected).abs().max().item() <= max(2 * direct_error, 1e-6 * expected.abs().max().item())


def test_winograd_serves_plain_3x3_convolutions_on_large_maps_only():
    layer = torch.nn.Conv2d(256, 256, 3, padding=1)
    at = lambda side, dtype=torch.float32: torch.empty(1, 256, side, side, dtype=dtype)  # noqa: E731
    assert winograd.runs_winograd(layer, at(16))
    assert not winograd.runs_winograd(layer, at(8))  # the direct kernel is faster there
    assert not winograd.runs_winograd(layer, at(16, torch.bfloat16))
    assert not winograd.runs_winograd(torch.nn.Conv2d(128, 256, 3, padding=1), at(16)[:, :128])
    for other in (dict(stride=2, padding=1), dict(padding=0), dict(padding=1, groups=2), dict(padding=2, dilation=2)):
        assert not winograd.runs_winograd(torch.nn.Conv2d(256, 256, 3, **other), at(16)), other


needs_onednn = pytest.mark.skipif(not packing_available("cpu"), reason="this PyTorch build has no oneDNN")


@needs_onednn
def test_a_packed_layer_runs_winograd_until_a_small_map_packs_it():
    generator = torch.Generator().manual_seed(1)
    layer = torch.nn.Conv2d(256, 256, 3, padding=1)
    plain = torch.nn.Conv2d(256, 256, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    PackedWeights(layer)
    with torch.no_grad():
        x = torch.randn(1, 256, 16, 16, generator=generator)
        assert_close_to_reference(layer(x), plain(x), rel=1e-5)
        assert not is_packed(layer) and torch.equal(layer.weight, plain.weight)  # the plain weight, kept
        small = torch.randn(1, 256, 8, 8, generator=generator)
        assert_close_to_reference(layer(small), plain(small), rel=1e-5)
        assert is_packed(layer)  # packed for the small map, and packed from then on
        assert_close_to_reference(layer(x), plain(x), rel=1e-5)


@needs_onednn
def test_a_weight_bound_convolution_runs_as_rows_at_every_size_and_gives_its_weight_back():
    generator = torch.Generator().manual_seed(2)
    layer = torch.nn.Conv2d(1280, 8, 3, padding=1)  # 11520 taps: rows on a map of 8x8 or less
    plain = torch.nn.Conv2d(1280, 8, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    PackedWeights(layer)
    with torch.no_grad():
        for size in [(4, 4), (5, 7), (16, 16)]:
            x = torch.randn(2, 1280, *size, generator=generator)
            assert_close_to_reference(layer(x), plain(x), rel=1e-5)
        assert is_packed(layer) and layer._packed_as_rows
        assert torch.equal(layer.state_dict()["weight"], plain.weight)  # bitwise, from the rows' layout
        with unpacked(layer):
            layer.weight.data = layer.weight.data * 2
        assert is_packed(layer) and layer._packed_as_rows
        x = torch.randn(1, 1280, 4, 4, generator=generator)
        assert_close_to_reference(layer(x), F.conv2d(x, plain.weight * 2, plain.bias, padding=1), rel=1e-5)
    unpadded = torch.nn.Conv2d(1280, 8, 3)  # the rows' output is smaller than the map here
    reference = F.conv2d(x, unpadded.weight, unpadded.bias)
    PackedWeights(unpadded)
    with torch.no_grad():
        assert_close_to_reference(unpadded(x), reference, rel=1e-5)
    assert unpadded._packed_as_rows
