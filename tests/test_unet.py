"""The CompVis-layout UNet against diffusers' UNet2DConditionModel built from the same weights.

diffusers is only an oracle here: its own single-file conversion turns our state dict (with the
``model.diffusion_model.`` prefix of the released checkpoints) into its layout.
"""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from conftest import assert_close_to_reference

from latent_diffusion.config import (
    LDM_BSR_SR,
    LDM_CIN256,
    LDM_INPAINT,
    LDM_TEXT2IMG256,
    SD1_INPAINT,
    SD1_UNET,
    SD2_UNET,
    SD2_X4_UPSCALER,
    ConfigError,
    UNetConfig,
)
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.nn.attention import AttentionBlock, grid_positions
from latent_diffusion.nn.layers import ResBlock, timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, context_dim=32)
TINY_SD1 = UNetConfig(**TINY, attention_resolutions=(1,), num_heads=4)
TINY_SD2 = UNetConfig(
    **TINY, attention_resolutions=(1, 2), num_heads=-1, num_head_channels=8,
    use_linear_in_transformer=True, legacy=False,
)
TINY_INPAINT = dataclasses.replace(TINY_SD1, in_channels=9)
TINY_X4 = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, context_dim=32, in_channels=7,
    attention_resolutions=(2, 4), num_heads=4, use_linear_in_transformer=True, legacy=False,
    num_classes=10, disable_self_attentions=(True, True, False),
)
TINY_DEEP = dataclasses.replace(TINY_SD1, transformer_depth=2, num_res_blocks=2)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with seeded random values of a sane scale (no zero-initialised outputs).

    In-place uniform draws (variance 1/fan_in for weights) keep full-size models quick to fill.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):  # normalisation gains
                p.uniform_(0.8, 1.2, generator=generator)
            else:
                p.uniform_(-0.2, 0.2, generator=generator)
    return model


def random_unet(config: UNetConfig, seed: int = 0) -> UNetModel:
    """A UNet built on meta (fast) and then filled with random weights on the CPU."""
    with torch.device("meta"):
        model = UNetModel(config)
    return randomize_(model.to_empty(device="cpu"), seed).eval()


def ldm_yaml(config: UNetConfig) -> dict:
    """The original-format YAML (as a dict) that diffusers' single-file loader reads."""
    params = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "attention_resolutions": list(config.attention_resolutions),
        "num_res_blocks": config.num_res_blocks,
        "channel_mult": list(config.channel_mult),
        "num_head_channels": config.num_head_channels,
        "use_spatial_transformer": config.use_spatial_transformer,
        "transformer_depth": config.transformer_depth,
        "context_dim": config.context_dim,
        "use_linear_in_transformer": config.use_linear_in_transformer,
        "legacy": config.legacy,
    }
    # diffusers reads a present num_heads as the head count, so -1 ("unset") must stay absent.
    if config.num_heads != -1:
        params["num_heads"] = config.num_heads
    if config.num_classes is not None:
        params["num_classes"] = config.num_classes
    if config.disable_self_attentions is not None:
        params["disable_self_attentions"] = list(config.disable_self_attentions)
    return {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def diffusers_twin(model: UNetModel) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel holding the same weights, through diffusers' own converter."""
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(ldm_yaml(model.config), checkpoint)
    if model.config.use_scale_shift_norm:
        config["resnet_time_scale_shift"] = "scale_shift"
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True, assign=True)
    return twin.eval()


def inputs(config: UNetConfig, batch: int = 2, size: int = 8, tokens: int = 7, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=generator)
    timesteps = torch.tensor([999.0, 17.5][:batch] + [3.0] * max(0, batch - 2))
    context = torch.randn(batch, tokens, config.context_dim, generator=generator)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator) if config.num_classes else None
    return x, timesteps, context, y


def compare_with_diffusers(config: UNetConfig, **input_kwargs) -> None:
    model = random_unet(config)
    twin = diffusers_twin(model)
    x, timesteps, context, y = inputs(config, **input_kwargs)
    with torch.no_grad():
        ours = model(x, timesteps, context, y)
        reference = twin(x, timesteps, encoder_hidden_states=context, class_labels=y).sample
    assert ours.shape == (x.shape[0], config.out_channels, *x.shape[2:])
    assert reference.abs().max() > 1e-2  # a non-trivial output, not zeroed projections
    assert_close_to_reference(ours, reference)


@pytest.mark.parametrize(
    "config",
    [TINY_SD1, TINY_SD2, TINY_INPAINT, TINY_X4, TINY_DEEP],
    ids=["sd1", "sd2", "inpaint9", "x4-upscaler", "depth2"],
)
def test_tiny_unet_matches_diffusers(config):
    compare_with_diffusers(config)


def test_scale_shift_norm_matches_diffusers():
    compare_with_diffusers(dataclasses.replace(TINY_SD1, use_scale_shift_norm=True))


def test_integer_and_scalar_timesteps():
    model = random_unet(TINY_SD1)
    x, _, context, _ = inputs(TINY_SD1)
    with torch.no_grad():
        as_long = model(x, torch.tensor([500, 500]), context)
        as_float = model(x, torch.tensor([500.0, 500.0]), context)
        as_scalar = model(x, 500, context)
    torch.testing.assert_close(as_long, as_float)
    torch.testing.assert_close(as_scalar, as_float)


def test_half_precision_weights_run_and_stay_close():
    """bf16 weights: GroupNorm runs in float32, the output comes back in the input's dtype."""
    model = random_unet(TINY_X4)
    x, t, context, y = inputs(TINY_X4)
    with torch.no_grad():
        reference = model(x, t, context, y)
        low = model.to(torch.bfloat16)(x, t, context, y)
    assert low.dtype == torch.float32
    assert_close_to_reference(low, reference, rel=5e-2)


def test_backward_reaches_every_parameter():
    model = random_unet(TINY_X4).train()
    x, t, context, y = inputs(TINY_X4)
    model(x, t, context, y).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (320, 33):
        reference = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), reference)


def _res_block_state_for_diffusers(block: ResBlock) -> dict:
    names = {
        "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
    }
    state = {}
    for key, value in block.state_dict().items():
        prefix, leaf = key.rsplit(".", 1)
        state[f"{names[prefix]}.{leaf}"] = value
    return state


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_resampling_res_block_matches_diffusers(direction, scale_shift):
    from diffusers.models.resnet import ResnetBlock2D

    ours = randomize_(ResBlock(32, 64, out_channels=64, use_scale_shift_norm=scale_shift, **{direction: True}))
    reference = ResnetBlock2D(
        in_channels=32, out_channels=64, temb_channels=64, eps=1e-5, groups=32,
        time_embedding_norm="scale_shift" if scale_shift else "default", **{direction: True},
    )
    reference.load_state_dict(_res_block_state_for_diffusers(ours), strict=True)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    with torch.no_grad():
        expected = reference(x, emb)
        got = ours(x, emb)
    assert got.shape[-1] == (16 if direction == "up" else 4)
    assert_close_to_reference(got, expected)


def test_attention_block_head_order_matches_diffusers():
    """AttentionBlock's fused qkv is head-major ([q, k, v] per head); diffusers' Attention splits them."""
    from diffusers.models.attention_processor import Attention

    channels, heads = 64, 4
    ours = randomize_(AttentionBlock(channels, heads))
    reference = Attention(
        channels, heads=heads, dim_head=channels // heads, norm_num_groups=32, eps=1e-5,
        residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True,
    )
    head_dim = channels // heads
    qkv_w = ours.qkv.weight[:, :, 0].view(heads, 3, head_dim, channels)
    qkv_b = ours.qkv.bias.view(heads, 3, head_dim)
    state = {"group_norm.weight": ours.norm.weight, "group_norm.bias": ours.norm.bias}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        state[f"{name}.weight"] = qkv_w[:, i].reshape(channels, channels)
        state[f"{name}.bias"] = qkv_b[:, i].reshape(channels)
    state["to_out.0.weight"] = ours.proj_out.weight[:, :, 0]
    state["to_out.0.bias"] = ours.proj_out.bias
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, channels, 6, 5)
    with torch.no_grad():
        assert_close_to_reference(ours(x), reference(x))


def _expected_attention_block_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj_out.weight", "proj_out.bias")}


def test_ldm_attention_block_unet_keys_and_forward():
    """use_spatial_transformer=False, resblock_updown and scale-shift: reference key names, and it runs."""
    config = UNetConfig(
        in_channels=7, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_heads=-1, num_head_channels=16, use_spatial_transformer=False,
        context_dim=None, resblock_updown=True, use_scale_shift_norm=True,
    )
    model = random_unet(config)
    state = model.state_dict()
    assert _expected_attention_block_keys("input_blocks.1.1") <= state.keys()
    assert _expected_attention_block_keys("middle_block.1") <= state.keys()
    assert state["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    # resblock_updown: the resampling stages are ResBlocks, not Downsample.op / Upsample.conv.
    assert "input_blocks.2.0.in_layers.2.weight" in state and "input_blocks.2.0.op.weight" not in state
    assert "output_blocks.1.2.in_layers.2.weight" in state
    assert state["input_blocks.1.0.emb_layers.1.weight"].shape == (2 * 32, 4 * 32)  # scale and shift
    assert not any("transformer_blocks" in k for k in state)
    x = torch.randn(2, 7, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([10.0, 900.0]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 1e-2


def test_plain_resampling_keys():
    config = dataclasses.replace(TINY_SD1, conv_resample=True)
    state = UNetModel(config).state_dict()
    assert "input_blocks.2.0.op.weight" in state and "output_blocks.1.1.conv.weight" in state
    no_conv = UNetModel(dataclasses.replace(TINY_SD1, conv_resample=False)).state_dict()
    assert not any(".op." in k or k.endswith("conv.weight") for k in no_conv)


def test_disable_self_attention_makes_attn1_cross_attend():
    config = dataclasses.replace(TINY_X4, context_dim=24, disable_middle_self_attn=True)
    state = UNetModel(config).state_dict()
    block = "transformer_blocks.0"
    assert state[f"input_blocks.3.1.{block}.attn1.to_k.weight"].shape[1] == 24  # level 1: disabled
    assert state[f"input_blocks.5.1.{block}.attn1.to_k.weight"].shape[1] == 64  # level 2: self-attention
    assert state[f"middle_block.1.{block}.attn1.to_k.weight"].shape[1] == 24


@pytest.mark.parametrize("spec", [LDM_CIN256, LDM_TEXT2IMG256, LDM_BSR_SR, LDM_INPAINT], ids=lambda s: s.family)
def test_ldm_presets_construct_on_meta(spec):
    config = spec.unet
    with torch.device("meta"):
        model = UNetModel(config)
    state = model.state_dict()
    assert state["input_blocks.0.0.weight"].shape[:2] == (config.model_channels, config.in_channels)
    assert state["out.2.weight"].shape[:2] == (config.out_channels, config.model_channels)
    deepest = config.model_channels * config.channel_mult[-1]
    if config.use_spatial_transformer:
        assert state["middle_block.1.proj_in.weight"].shape == (deepest, deepest, 1, 1)
        assert state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (deepest, config.context_dim)
        assert not any(k.endswith("qkv.weight") for k in state)
    else:
        assert state["middle_block.1.qkv.weight"].shape == (3 * deepest, deepest, 1)
        assert not any("transformer_blocks" in k for k in state)
    assert ("input_blocks.3.0.in_layers.0.weight" in state) == config.resblock_updown
    assert ("input_blocks.3.0.op.weight" in state) == (not config.resblock_updown)
    levels = len(config.channel_mult)
    stages = 1 + levels * (config.num_res_blocks + 1) - 1
    assert {int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")} == set(range(stages))
    assert {int(k.split(".")[1]) for k in state if k.startswith("output_blocks.")} == set(
        range(levels * (config.num_res_blocks + 1))
    )


def test_meta_construction_is_fast_and_loads_strictly():
    UNetModel(TINY_SD1)  # warm up lazy imports
    start = time.perf_counter()
    with torch.device("meta"):
        model = UNetModel(SD1_UNET)
    assert time.perf_counter() - start < 5.0
    small = random_unet(TINY_SD1)
    with torch.device("meta"):
        empty = UNetModel(TINY_SD1)
    empty.load_state_dict(small.state_dict(), strict=True, assign=True)
    assert len(model.state_dict()) == 686


@pytest.mark.parametrize(
    "config, count",
    [(SD1_UNET, 859_520_964), (SD2_UNET, 865_910_724)],
    ids=["sd1.5", "sd2.1"],
)
def test_full_size_parameter_and_key_counts(config, count):
    with torch.device("meta"):
        model = UNetModel(config)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == 686


def test_bad_inputs_raise_clear_errors():
    model = UNetModel(TINY_X4)
    x, t, context, y = inputs(TINY_X4)
    with pytest.raises(ValueError, match="input must be shaped"):
        model(x[:, :4], t, context, y)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(x[..., :6, :6], t, context, y)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1], context, y)
    with pytest.raises(ValueError, match="pass context"):
        model(x, t, None, y)
    with pytest.raises(ValueError, match="context must be shaped"):
        model(x, t, context[..., :5], y)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t, context, None)
    with pytest.raises(ValueError, match="not class-conditional"):
        UNetModel(TINY_SD1)(x[:, :4], t, context, y)
    with pytest.raises(ConfigError, match="disable_self_attentions"):
        UNetModel(dataclasses.replace(TINY_X4, disable_self_attentions=(True,)))
    with pytest.raises(ConfigError, match="num_head_channels"):
        UNetModel(dataclasses.replace(TINY_SD1, use_spatial_transformer=False, num_heads=-1, num_head_channels=24))


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, size",
    [(SD1_UNET, 8), (SD2_UNET, 8), (SD1_INPAINT.unet, 8), (SD2_X4_UPSCALER.unet, 16)],
    ids=["sd1.5", "sd2.1", "sd1-inpaint", "x4-upscaler"],
)
def test_full_size_unet_matches_diffusers(config, size):
    compare_with_diffusers(config, batch=2, size=size, tokens=77)


def test_grid_positions_tell_every_token_apart_and_mean_the_same_at_every_resolution():
    coarse = grid_positions(4, 6, 34, torch.float32, torch.device("cpu"))
    assert coarse.shape == (24, 34)
    assert torch.cdist(coarse, coarse).add(torch.eye(24) * 10).min() > 0.1  # no two tokens alike
    assert coarse[:, 32:].abs().max() == 0  # channels past a multiple of four stay zero
    grid = coarse.view(4, 6, 34)
    assert (grid[:, :3, 8] > 0).all() and (grid[:, 3:, 8] < 0).all()  # cos(pi u): positive on the left half
    # Token centres at the same fractions of the image (1/6, 1/2, 5/6 of a 3- and a 9-token side) match.
    three = grid_positions(3, 3, 32, torch.float32, torch.device("cpu")).view(3, 3, 32)
    nine = grid_positions(9, 9, 32, torch.float32, torch.device("cpu")).view(9, 9, 32)
    assert torch.allclose(three, nine[1::3, 1::3], atol=1e-6)


def test_transformer_positions_make_attention_depend_on_place():
    torch.manual_seed(0)
    plain = UNetModel(TINY_SD1).eval()
    placed = UNetModel(dataclasses.replace(TINY_SD1, transformer_positions=True)).eval()
    assert placed.state_dict().keys() == plain.state_dict().keys()  # no new weights
    block, placed_block = plain.input_blocks[1][1], placed.input_blocks[1][1]
    torch.nn.init.normal_(block.proj_out.weight)  # zero-initialised, which would hide the attention
    placed_block.load_state_dict(block.state_dict())
    flat = torch.randn(2, 32, 1, 1).expand(2, 32, 8, 8).contiguous()
    context = torch.randn(2, 5, 32)
    with torch.no_grad():
        same_everywhere, by_place = block(flat, context), placed_block(flat, context)
    assert torch.allclose(same_everywhere, same_everywhere[..., :1, :1].expand_as(same_everywhere), atol=1e-5)
    assert (by_place - by_place[..., :1, :1]).abs().amax() > 1e-2


def test_diffusers_layout_refuses_transformer_positions():
    from latent_diffusion.checkpoints.convert import _check_supported
    from latent_diffusion.checkpoints.io import CheckpointError
    from latent_diffusion.config import SD1

    spec = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, transformer_positions=True))
    with pytest.raises(CheckpointError, match="grid positions"):
        _check_supported(spec)
