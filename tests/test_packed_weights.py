"""Packed weights (nn/packed.py), the CPU's default exact path, against the plain layers they replace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latent_diffusion.checkpoints.io import _file_mapped, read_state_dict
from latent_diffusion.nn.packed import PackedWeights, is_packed, packing_available, unpacked
from latent_diffusion.pipelines.common import Pipeline
from conftest import assert_close_to_reference
from pipeline_tiny import TINY_SD1, TINY_SDXL, TINY_X4, write_checkpoint

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not packing_available("cpu"), reason="this PyTorch build has no oneDNN")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    return {name: write_checkpoint(spec, folder / f"{name}.safetensors")
            for name, spec in (("sd1", TINY_SD1), ("x4", TINY_X4), ("sdxl", TINY_SDXL))}


def _unet_inputs(pipe: Pipeline, batch: int, height: int, width: int):
    spec, generator = pipe.spec.unet, torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_channels, height, width, generator=generator)
    t = torch.tensor([999.0, 500.0, 3.0][:batch])
    context = torch.randn(batch, 7, spec.context_dim, generator=generator)
    y = (torch.randn(batch, spec.adm_in_channels, generator=generator) if spec.adm_in_channels
         else torch.tensor([20, 300, 7][:batch]) if spec.num_classes else None)  # SDXL's ADM vector, x4's noise level
    return x, t, context, y


@pytest.mark.parametrize("name", ["sd1", "x4", "sdxl"])
def test_packed_unet_and_vae_compute_what_the_plain_ones_do(checkpoints, name):
    """1x1-convolution (SD 1) and linear (SD 2, SDXL) projections, odd sizes; the text encoders stay plain."""
    plain = Pipeline.from_checkpoint(checkpoints[name], progress=False, packed=False)
    packed = Pipeline.from_checkpoint(checkpoints[name], progress=False)
    assert plain.packed_weights is None and packed.packed_weights is not None
    assert not packed.packed_weights.packed_layers  # nothing is packed before it runs
    # Sizes whose deepest level is still 2x2 or more: at 1x1 a GroupNorm of two channels a group turns
    # rounding differences into 1e-4 of either path's error (measured against float64).
    for size in [(8, 12), (16, 8)]:
        inputs = _unet_inputs(plain, 3, *size)
        with torch.no_grad():
            assert_close_to_reference(packed.unet_forward(*inputs), plain.unet_forward(*inputs), rel=2e-5)
    latents = torch.randn(2, plain.spec.autoencoder.embed_dim, 6, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_to_reference(packed.decode(latents, tiled=False), plain.decode(latents, tiled=False), rel=1e-5)
        assert_close_to_reference(packed.decode(latents, tiled=True), plain.decode(latents, tiled=True), rel=1e-5)
    if plain.takes_text:
        ours, reference = (pipe.text_conditioning("a red circle", "", 1, None, width=64, height=64)[0]
                           for pipe in (packed, plain))
        for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(reference)):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
        assert not any(is_packed(layer) for layer in packed.model.condition_encoder.modules())
    layers = packed.packed_weights.packed_layers
    geglus = [m.proj for m in packed.model.unet.modules() if type(m).__name__ == "GEGLU"]
    assert geglus and all(isinstance(proj._packed_weight, tuple) for proj in geglus)  # ran fused, as halves
    assert any(isinstance(layer, torch.nn.Conv2d) for layer in layers)
    assert any(isinstance(layer, torch.nn.Linear) for layer in layers)
    # Packed, the plain storage is given up; the state dict still reads the file's values, bitwise.
    assert all(layer.weight.numel() == 0 for layer in layers)
    file = read_state_dict(checkpoints[name])
    for key, value in packed.model.state_dict().items():
        assert torch.equal(value, file[key]), key


def test_the_first_image_equals_the_next_and_the_plain_image_within_a_level(checkpoints):
    options = dict(width=32, height=32, steps=3, seed=2, sampler="dpmpp_2m")
    packed = Pipeline.from_checkpoint(checkpoints["sd1"], progress=False)
    first, second = (np.asarray(packed.txt2img("a red circle", **options).images[0], np.int16) for _ in range(2))
    np.testing.assert_array_equal(first, second)  # packed from the first call on: no warm-up image
    plain = Pipeline.from_checkpoint(checkpoints["sd1"], progress=False, packed=False)
    reference = np.asarray(plain.txt2img("a red circle", **options).images[0], np.int16)
    assert np.abs(first - reference).max() <= 1


def test_unpacked_gives_the_weights_back_to_change_and_packs_the_changes(checkpoints):
    pipe = Pipeline.from_checkpoint(checkpoints["sd1"], progress=False)
    x, t, context, y = _unet_inputs(pipe, 1, 8, 8)
    with torch.no_grad():
        before = pipe.unet_forward(x, t, context, y)
    conv_out = pipe.model.unet.out[2]
    assert is_packed(conv_out)
    with pipe.plain_weights():
        assert not is_packed(conv_out) and conv_out.weight.shape[0] == pipe.spec.unet.out_channels
        original = conv_out.weight.data
        conv_out.weight.data = original * 2
    assert is_packed(conv_out)
    with torch.no_grad():
        changed = pipe.unet_forward(x, t, context, y)
        with pipe.plain_weights():
            conv_out.weight.data = original
        assert torch.equal(pipe.unet_forward(x, t, context, y), before)
    assert not torch.allclose(changed, before)


def test_packed_layers_refuse_autograd_and_other_modes_refuse_packing(checkpoints):
    pipe = Pipeline.from_checkpoint(checkpoints["sd1"], progress=False)
    x, t, context, y = _unet_inputs(pipe, 1, 8, 8)
    x.requires_grad_(True)
    pipe.unet_forward(x, t, context, y).sum().backward()  # not packed yet: the layers on x's path run as they are
    conv_in = pipe.model.unet.input_blocks[0][0]
    assert x.grad is not None and not is_packed(conv_in)
    pipe.unet_forward(x.detach(), t, context, y)  # frozen weights: no torch.no_grad() needed to pack and run
    assert is_packed(conv_in)
    with pytest.raises(RuntimeError, match="no gradients"):
        pipe.unet_forward(x, t, context, y)
    with pytest.raises(ValueError, match="torch.float16; packing takes fp32"):
        Pipeline.from_checkpoint(checkpoints["sd1"], progress=False, half=True, packed=True)
    with pytest.raises(ValueError, match="lean and compiled modes"):
        Pipeline.from_checkpoint(checkpoints["sd1"], progress=False, lean=True, packed=True)
    assert Pipeline.from_checkpoint(checkpoints["sd1"], progress=False, half=True).packed_weights is None


def test_a_layer_mapped_from_its_file_packs_with_its_values(checkpoints):
    state = read_state_dict(checkpoints["sd1"])
    layer = torch.nn.Conv2d(*state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"].shape[:2], 3,
                            padding=1)
    layer.weight.data = state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    assert _file_mapped(layer.weight) and not _file_mapped(torch.zeros(4))
    packed = PackedWeights(layer)
    x = torch.randn(1, layer.in_channels, 5, 5)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, layer.weight.clone(), layer.bias, padding=1)
        assert_close_to_reference(layer(x), expected, rel=1e-5)
    assert packed.packed_layers == [layer]


def test_a_strided_convolution_is_packed_for_its_first_size_and_runs_at_every_size():
    generator = torch.Generator().manual_seed(3)
    layer = torch.nn.Conv2d(32, 48, 3, stride=2, padding=1)
    plain = torch.nn.Conv2d(32, 48, 3, stride=2, padding=1)
    plain.load_state_dict(layer.state_dict())
    PackedWeights(layer)
    with torch.no_grad():
        for size in [(8, 8), (16, 12), (8, 8)]:
            x = torch.randn(2, 32, *size, generator=generator)
            assert_close_to_reference(layer(x), plain(x), rel=1e-5)
        assert layer._packed_nominal == [1, 32, 8, 8]  # the first call's size, not the nominal 32x32
        with unpacked(layer):
            layer.weight.data = layer.weight.data * 2
        assert is_packed(layer) and layer._packed_nominal == [1, 32, 8, 8]  # packed again for that size
        x = torch.randn(1, 32, 8, 8, generator=generator)
        assert_close_to_reference(layer(x), torch.nn.functional.conv2d(x, plain.weight * 2, plain.bias, stride=2,
                                                                       padding=1), rel=1e-5)
