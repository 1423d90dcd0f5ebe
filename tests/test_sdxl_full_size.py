"""SDXL's networks at full size with random weights, against diffusers / transformers.

The original-layout state dicts go through diffusers' own single-file converters, as diffusers
loads an ``sd_xl_base_1.0.safetensors``; the reference models hold the very same tensors (loaded
with ``assign``), so one copy of the weights is in memory: about 10.5 GiB for the base UNet in
fp32. These tests skip where that much memory is not available, and say so.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close_to_reference
from test_unet import random_unet

from latent_diffusion.config import OPENCLIP_BIGG, SD_VAE, SDXL, SDXL_CLIP_L, SDXL_REFINER, UNetConfig
from latent_diffusion.models.text_encoders import CLIPTextEncoder
from latent_diffusion.nn.layers import timestep_embedding
from latent_diffusion.models.tokenizer import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils  # noqa: E402

PROMPTS = ["a photo of an astronaut riding a horse on mars", "Tom & Jerry, 1999 (masterpiece)"]


def _available_gib() -> float:
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def needs_memory(gib: float):
    available = _available_gib() if os.path.exists("/proc/meminfo") else float("inf")
    return pytest.mark.skipif(available < gib, reason=f"needs {gib} GiB of free memory, {available:.1f} available")


def _sgm_yaml(config: UNetConfig) -> dict:
    """The UNet section of Stability's sd_xl_base.yaml / sd_xl_refiner.yaml, as diffusers reads it."""
    params = dict(
        adm_in_channels=config.adm_in_channels, num_classes="sequential", in_channels=config.in_channels,
        out_channels=config.out_channels, model_channels=config.model_channels,
        attention_resolutions=list(config.attention_resolutions), num_res_blocks=config.num_res_blocks,
        channel_mult=list(config.channel_mult), num_head_channels=config.num_head_channels,
        use_linear_in_transformer=True, transformer_depth=[max(d, 1) for d in config.transformer_depth]
        if isinstance(config.transformer_depth, tuple) else config.transformer_depth,
        context_dim=config.context_dim, legacy=False,
    )
    return {"model": {"params": {"network_config": {"params": params},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


@pytest.mark.slow
@needs_memory(14)
@pytest.mark.parametrize("spec", [SDXL, SDXL_REFINER], ids=["base", "refiner"])
@torch.no_grad()
def test_full_size_sdxl_unet_matches_diffusers(spec):
    ours = random_unet(spec.unet)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    config = single_file_utils.create_unet_diffusers_config_from_ldm(_sgm_yaml(spec.unet), checkpoint)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True, assign=True)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in ours.parameters())

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([999.0, 17.5])
    context = torch.randn(2, 77, spec.unet.context_dim, generator=generator)
    pooled = torch.randn(2, OPENCLIP_BIGG.width, generator=generator)
    numbers = len(spec.conditioner.micro_conditions) * 2 - ("aesthetic_score" in spec.conditioner.micro_conditions)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0][:numbers], [512.0, 512.0, 8.0, 0.0, 6.0, 6.0][:numbers]])
    # Our ADM vector: the pooled text, then 256 sinusoidal features of each number (GeneralConditioner.vector).
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)], dim=1)
    reference = twin(x, timesteps, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert reference.abs().max() > 1e-2
    assert_close_to_reference(ours(x, timesteps, context, y), reference)


def _tokens(config) -> torch.Tensor:
    return CLIPTokenizer(pad_with_eos=config.pad_with_eos)(PROMPTS)


def _random_text_encoder(config) -> CLIPTextEncoder:
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(config).eval()
    with torch.no_grad():  # LayerNorms start as identity; random affines make a swapped key visible
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return encoder


def _hf_config(config, **extra):
    return transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, max_position_embeddings=77,
        hidden_act=config.activation, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407 if config.pad_with_eos else 0, **extra)


@pytest.mark.slow
@needs_memory(8)
@torch.no_grad()
def test_full_size_bigg_hidden_states_and_pooled_output_match_transformers():
    ours = _random_text_encoder(OPENCLIP_BIGG)
    prefix = "conditioner.embedders.1.model."
    checkpoint = {f"{prefix}{k.removeprefix('model.')}": v for k, v in ours.state_dict().items()}
    # Built for real (not on meta): transformers keeps buffers that a state dict does not hold.
    reference = transformers.CLIPTextModelWithProjection(_hf_config(OPENCLIP_BIGG, projection_dim=1280))
    converted = single_file_utils.convert_open_clip_checkpoint(reference, checkpoint, prefix=prefix)
    if not hasattr(reference, "text_model"):  # transformers >= 5.6 dropped the text_model level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    assert sum(p.numel() for p in reference.parameters()) == 694_659_840
    tokens = _tokens(OPENCLIP_BIGG)
    expected = reference.eval()(input_ids=tokens, output_hidden_states=True)
    encoding = ours.encode(tokens)
    # SDXL reads the penultimate layer without the final LayerNorm, and the projected pooled output.
    assert_close_to_reference(encoding.hidden_states, expected.hidden_states[-2])
    assert_close_to_reference(encoding.projected, expected.text_embeds)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sdxl_clip_l_reads_the_penultimate_layer_as_transformers():
    ours = _random_text_encoder(SDXL_CLIP_L)
    checkpoint = {f"conditioner.embedders.0.{k}": v for k, v in ours.state_dict().items()}
    converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint, remove_prefix="conditioner.embedders.0.transformer.")
    reference = transformers.CLIPTextModel(_hf_config(SDXL_CLIP_L)).eval()
    if not hasattr(reference, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    tokens = _tokens(SDXL_CLIP_L)
    expected = reference(input_ids=tokens, output_hidden_states=True).hidden_states[-2]
    assert_close_to_reference(ours.encode(tokens).hidden_states, expected)
    assert_close_to_reference(ours(tokens), expected)


def test_sdxl_vae_is_the_sd_vae_network():
    # Same network (test_autoencoder.py's full-size test holds it to diffusers); only the latent scale differs.
    assert SDXL.autoencoder == SDXL_REFINER.autoencoder == SD_VAE
    assert SDXL.scale_factor == 0.13025
