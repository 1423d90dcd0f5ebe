"""Whole-network proofs of the CompVis latent-diffusion UNets against diffusers, at their released sizes.

Each test builds our UNetModel with random weights, builds the diffusers model of the same architecture
(``UNet2DConditionModel`` for the cross-attention models, ``UNet2DModel`` for the ones with the older
AttentionBlock), moves the weights across by the key mapping below and compares the outputs. The
mapping lives here on purpose: the package knows diffusers names only for the SD layouts it converts.

The architectures are the released models' ``unet_config.params``, transcribed in RELEASED_UNETS;
a fast test checks that our presets say the same.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from test_unet import random_unet

from latent_diffusion.config import UNetConfig, from_mapping, preset
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.nn.attention import AttentionBlock, SpatialTransformer
from latent_diffusion.nn.layers import Downsample, ResBlock, Upsample

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402

# The CompVis openaimodel.UNetModel defaults that a released config leaves implicit.
COMPVIS_UNET_DEFAULTS = dict(
    num_heads=-1, num_head_channels=-1, use_spatial_transformer=False, transformer_depth=1,
    context_dim=None, use_scale_shift_norm=False, resblock_updown=False, conv_resample=True,
    legacy=True, num_classes=None, dropout=0.0, dims=2,
)

# unet_config.params of the released latent-diffusion paper models, keyed by our family name.
RELEASED_UNETS = {
    "ldm-cin256": dict(  # cin256
        image_size=32, in_channels=4, out_channels=4, model_channels=256, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=32, use_spatial_transformer=True,
        transformer_depth=1, context_dim=512,
    ),
    "ldm-text2img256": dict(  # text2img256
        image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
        num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_head_channels=32, use_spatial_transformer=True,
        transformer_depth=1, context_dim=640,
    ),
    "ldm-sr": dict(  # bsr_sr
        image_size=64, in_channels=6, out_channels=3, model_channels=160, attention_resolutions=[16, 8],
        num_res_blocks=2, channel_mult=[1, 2, 2, 4], num_head_channels=32,
    ),
    "ldm-inpaint": dict(  # inpainting_big
        image_size=64, in_channels=7, out_channels=3, model_channels=256, attention_resolutions=[8, 4, 2],
        num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_heads=8, resblock_updown=True,
    ),
    # No preset of ours: the one released LDM with scale-shift norm (with resblock up/down and
    # AttentionBlocks whose head width changes from level to level).
    "lsun-churches256": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=192, attention_resolutions=[1, 2, 4, 8],
        num_res_blocks=2, channel_mult=[1, 2, 2, 4, 4], num_heads=8, use_scale_shift_norm=True,
        resblock_updown=True,
    ),
}


def released_unet(name: str) -> UNetConfig:
    return from_mapping(UNetConfig, {**COMPVIS_UNET_DEFAULTS, **RELEASED_UNETS[name]}, ignore=("image_size",))


@pytest.mark.parametrize("family", ["ldm-cin256", "ldm-text2img256", "ldm-sr", "ldm-inpaint"])
def test_presets_are_the_released_unets(family):
    assert preset(family).unet == released_unet(family)


# --- the diffusers model of a config ----------------------------------------------------------------

def heads_at(config: UNetConfig, channels: int) -> int:
    """Attention heads at ``channels`` by the released rule: a fixed head width, else a fixed count."""
    if config.num_head_channels != -1:
        return channels // config.num_head_channels
    return config.num_heads


def _level_has_attention(config: UNetConfig, level: int) -> bool:
    return 2**level in config.attention_resolutions


def _block_types(config: UNetConfig) -> tuple[list[str], list[str]]:
    if config.use_spatial_transformer:
        attn_down, attn_up = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
    else:
        attn_down, attn_up = "AttnDownBlock2D", "AttnUpBlock2D"
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if config.resblock_updown else ("DownBlock2D", "UpBlock2D")
    )
    levels = range(len(config.channel_mult))
    down = [attn_down if _level_has_attention(config, level) else plain_down for level in levels]
    up = [attn_up if _level_has_attention(config, level) else plain_up for level in reversed(levels)]
    return down, up


def diffusers_unet(config: UNetConfig) -> torch.nn.Module:
    """diffusers' model of ``config``, on the meta device (weights come by ``load_state_dict(assign=True)``)."""
    down, up = _block_types(config)
    widths = [config.model_channels * mult for mult in config.channel_mult]
    common = dict(
        in_channels=config.in_channels, out_channels=config.out_channels, down_block_types=down,
        up_block_types=up, block_out_channels=widths, layers_per_block=config.num_res_blocks,
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        num_class_embeds=config.num_classes,
    )
    with torch.device("meta"):
        if config.use_spatial_transformer:
            assert not config.resblock_updown, "diffusers' cross-attention blocks resample by convolution only"
            return diffusers.UNet2DConditionModel(
                **common, mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=config.context_dim,
                # UNet2DConditionModel reads attention_head_dim as the number of heads.
                attention_head_dim=[heads_at(config, width) for width in widths],
                transformer_layers_per_block=config.transformer_depth,
                use_linear_projection=config.use_linear_in_transformer,
            )
        resample = "resnet" if config.resblock_updown else "conv"
        model = diffusers.UNet2DModel(
            **common, downsample_type=resample, upsample_type=resample, attn_norm_num_groups=32,
            attention_head_dim=widths[-1] // heads_at(config, widths[-1]),
        )
        _set_attention_heads(model, config)
    return model


def _set_attention_heads(model: torch.nn.Module, config: UNetConfig) -> None:
    """Give every attention layer of a UNet2DModel the released head count of its width.

    UNet2DModel takes one head width for all levels, while a fixed ``num_heads`` makes the width
    grow with the level; layers with another count are rebuilt as diffusers' blocks build theirs.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, Attention):
            continue
        channels = module.inner_dim
        heads = heads_at(config, channels)
        if module.heads == heads:
            continue
        parent, index = name.rsplit(".", 1)
        model.get_submodule(parent)[int(index)] = Attention(
            channels, heads=heads, dim_head=channels // heads, eps=1e-5, norm_num_groups=32,
            residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True,
        )


# --- our state dict in diffusers names -----------------------------------------------------------

RESBLOCK_NAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
TOP_LEVEL_NAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}


def _attention_block_state(block: AttentionBlock) -> dict[str, torch.Tensor]:
    # Our fused qkv is head-major: rows [q_h, k_h, v_h] for each head h.
    channels, heads = block.channels, block.heads
    weight = block.qkv.weight[:, :, 0].reshape(heads, 3, channels // heads, channels)
    bias = block.qkv.bias.reshape(heads, 3, channels // heads)
    state = {"group_norm.weight": block.norm.weight, "group_norm.bias": block.norm.bias,
             "to_out.0.weight": block.proj_out.weight[:, :, 0], "to_out.0.bias": block.proj_out.bias}
    for index, name in enumerate(("to_q", "to_k", "to_v")):
        state[f"{name}.weight"] = weight[:, index].reshape(channels, channels)
        state[f"{name}.bias"] = bias[:, index].reshape(channels)
    return state


def _layer_state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = layer.state_dict()
    if isinstance(layer, ResBlock):
        renamed = {}
        for key, value in state.items():
            module, leaf = key.rsplit(".", 1)
            renamed[f"{RESBLOCK_NAMES[module]}.{leaf}"] = value
        return renamed
    if isinstance(layer, AttentionBlock):
        return _attention_block_state(layer)
    if isinstance(layer, Downsample):
        return {key.replace("op.", "conv.", 1): v for key, v in state.items()}
    assert isinstance(layer, (SpatialTransformer, Upsample)), type(layer)
    return dict(state)  # the same names on both sides


def _is_resampler(layer: torch.nn.Module) -> bool:
    return isinstance(layer, (Downsample, Upsample)) or (isinstance(layer, ResBlock) and layer.resample is not None)


def _stage_targets(model: UNetModel):
    """(our stage, the diffusers block it belongs to, the index of its resnet/attention in that block)."""
    config = model.config
    levels, per_level = len(config.channel_mult), config.num_res_blocks
    stages = iter(list(model.input_blocks)[1:])
    for level in range(levels):
        for index in range(per_level + (level != levels - 1)):
            yield next(stages), f"down_blocks.{level}", index
    yield model.middle_block, "mid_block", 0
    stages = iter(model.output_blocks)
    for up in range(levels):
        for index in range(per_level + 1):
            yield next(stages), f"up_blocks.{up}", index


def diffusers_state(model: UNetModel) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names (views of ours where the layouts agree)."""
    ours = model.state_dict()
    state = {}
    for key, value in ours.items():
        module, leaf = key.rsplit(".", 1)
        if module in TOP_LEVEL_NAMES:
            state[f"{TOP_LEVEL_NAMES[module]}.{leaf}"] = value
    for stage, block, index in _stage_targets(model):
        resnets = 0
        for layer in stage:
            if _is_resampler(layer):
                prefix = f"{block}.{'downsamplers' if block.startswith('down') else 'upsamplers'}.0"
            elif isinstance(layer, ResBlock):
                # The middle block holds two resnets around its attention; other stages hold one.
                prefix, resnets = f"{block}.resnets.{index + resnets}", resnets + 1
            else:
                prefix = f"{block}.attentions.{index}"
            state.update({f"{prefix}.{key}": value for key, value in _layer_state(layer).items()})
    return state


# --- the proofs ---------------------------------------------------------------------------------

def relative_difference_to_diffusers(config: UNetConfig, size: int = 16, context_tokens: int = 0) -> float:
    """Run our UNet and its diffusers twin on one input; assert they agree; return max|diff| / max|ref|.

    ``context_tokens``: the length of the cross-attention context, for the models that have one.
    """
    model = random_unet(config)
    twin = diffusers_unet(config)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())
    # assign=True: the twin holds our tensors (or slices of them), so the weights exist once in memory.
    twin.load_state_dict(diffusers_state(model), strict=True, assign=True)
    twin.eval()

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, size, size, generator=generator)
    timesteps = torch.tensor([999.0, 17.5])
    with torch.no_grad():
        if config.use_spatial_transformer:
            context = torch.randn(2, context_tokens, config.context_dim, generator=generator)
            reference = twin(x, timesteps, encoder_hidden_states=context).sample
            ours = model(x, timesteps, context)
        else:
            reference = twin(x, timesteps).sample
            ours = model(x, timesteps)
    assert reference.abs().max() > 1e-2  # a non-trivial output, not zeroed projections
    assert_close_to_reference(ours, reference)
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, context_tokens",
    # cin256's context is one class-embedding token; text2img256's is 77 BERT tokens.
    [("ldm-cin256", 1), ("ldm-sr", 0), ("ldm-inpaint", 0), ("ldm-text2img256", 77)],
)
def test_released_ldm_unet_matches_diffusers(family, context_tokens):
    relative_difference_to_diffusers(preset(family).unet, context_tokens=context_tokens)


@pytest.mark.slow
def test_scale_shift_resblock_updown_attention_block_unet_matches_diffusers():
    """The released LSUN-churches UNet: scale-shift norm, resblock up/down, AttentionBlock."""
    config = released_unet("lsun-churches256")
    assert config.use_scale_shift_norm and config.resblock_updown and not config.use_spatial_transformer
    relative_difference_to_diffusers(config)
