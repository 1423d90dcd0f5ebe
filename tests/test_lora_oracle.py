"""LoRA files merged into our weights against diffusers' ``load_lora_weights`` + ``fuse_lora``.

Both sides start from the same tiny random model (our file, converted to a diffusers folder by our
converter) and read the same random LoRA tensors; the UNet and text-encoder outputs must agree
within 1e-4 of the reference's magnitude.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import assert_close_to_reference
from latent_diffusion.addons.lora_file import read_lora_file
from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.checkpoints.load import load_checkpoint
from lora_tiny import TEXT_LAYERS, UNET_LAYERS, kohya_lora, layers, peft_lora
from pipeline_tiny import (
    SD_SCHEDULER, TINY_SD1, TINY_SDXL, diffusers_components, diffusers_folder, sdxl_components, write_checkpoint,
)
from checkpoint_tiny import TINY_SD2

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(cls, components):
    from diffusers import DDIMScheduler

    options = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if cls.__name__ == "StableDiffusionPipeline" else {}
    return cls(**components, scheduler=DDIMScheduler(**SD_SCHEDULER), **options)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    checkpoint = write_checkpoint(TINY_SD1, folder / "model.safetensors")
    return checkpoint, diffusers_folder(checkpoint, folder / "diffusers")


def _unet_inputs(context_dim: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([417]),
            torch.randn(1, 7, context_dim, generator=generator))


def _ours_and_reference_unet(loaded, reference_unet, context_dim: int, y=None, added=None):
    x, t, context = _unet_inputs(context_dim)
    with torch.no_grad():
        ours = loaded.model.unet(x, t, context=context, y=y)
        theirs = reference_unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    return ours, theirs


def _tokens(vocab: int, seed: int = 2) -> torch.Tensor:
    tokens = torch.randint(1, vocab - 1, (2, 77), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0], tokens[:, 40] = 49406 if vocab > 49406 else 0, vocab - 1  # start, end (its first occurrence)
    return tokens


def _merge(checkpoint, path, unet: float, text: float, family=None):
    loaded = load_checkpoint(checkpoint, family=family)
    changed, warnings = MergedLoras(loaded.model, loaded.family, loaded.spec).apply(
        [LoraUse(read_lora_file(path), unet, text)])
    assert changed and warnings == []  # every layer of the file found its place
    return loaded


def _fuse(reference, path, unet: float, text: float, text_encoders=("text_encoder",)):
    reference.load_lora_weights(str(path.parent), weight_name=path.name)
    reference.fuse_lora(components=["unet"], lora_scale=unet)
    reference.fuse_lora(components=list(text_encoders), lora_scale=text)


def _write_peft(reference, folder, unet_layers, text_layers):
    """A LoRA as diffusers writes one: PEFT's layout, alphas in the metadata (one set by pattern)."""
    from peft import LoraConfig

    def suffixes(names):  # PEFT matches target modules by the end of their names
        return sorted({".".join(name.split(".")[-2:]) for name in names})

    first = next(iter(unet_layers))
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=suffixes(unet_layers), alpha_pattern={first: 3.0})
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=suffixes(text_layers))
    reference.save_lora_weights(folder, unet_lora_layers=peft_lora(unet_layers, ""),
                                text_encoder_lora_layers=peft_lora(text_layers, "", seed=1),
                                unet_lora_adapter_metadata=unet_config.to_dict(),
                                text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_sd1_lora_matches_diffusers_fuse_lora(sd1, tmp_path, layout):
    from diffusers import StableDiffusionPipeline

    checkpoint, folder = sd1
    reference = _reference(StableDiffusionPipeline, diffusers_components(folder))
    unet_layers, text_layers = layers(reference.unet, UNET_LAYERS), layers(reference.text_encoder, TEXT_LAYERS)
    if layout == "kohya":
        path = tmp_path / "lora.safetensors"
        save_safetensors({**kohya_lora(unet_layers, "lora_unet_"), **kohya_lora(text_layers, "lora_te_", seed=1)}, path)
    else:
        path = _write_peft(reference, tmp_path, unet_layers, text_layers)
    _fuse(reference, path, 0.8, 0.6)
    loaded = _merge(checkpoint, path, 0.8, 0.6)

    ours, theirs = _ours_and_reference_unet(loaded, reference.unet, TINY_SD1.unet.context_dim)
    base, _ = _ours_and_reference_unet(load_checkpoint(checkpoint), reference.unet, TINY_SD1.unet.context_dim)
    assert (theirs - base).abs().max() > 0.05 * theirs.abs().max()  # the LoRA changes the output
    assert_close_to_reference(ours, theirs)
    tokens = _tokens(TINY_SD1.conditioner.vocab_size)
    with torch.no_grad():
        assert_close_to_reference(loaded.model.condition_encoder(tokens), reference.text_encoder(tokens).last_hidden_state)


def test_sd2_split_qkv_loras_land_on_their_third_of_openclips_fused_projection(tmp_path):
    from diffusers import StableDiffusionPipeline

    checkpoint = write_checkpoint(TINY_SD2, tmp_path / "sd2.safetensors")
    reference = _reference(StableDiffusionPipeline, diffusers_components(diffusers_folder(checkpoint, tmp_path / "d")))
    unet_layers, text_layers = layers(reference.unet, UNET_LAYERS), layers(reference.text_encoder, TEXT_LAYERS)
    assert any(name.endswith("k_proj") for name in text_layers)
    path = tmp_path / "lora.safetensors"
    save_safetensors({**kohya_lora(unet_layers, "lora_unet_"), **kohya_lora(text_layers, "lora_te_", seed=1)}, path)
    _fuse(reference, path, 1.0, 0.7)
    loaded = _merge(checkpoint, path, 1.0, 0.7)

    assert_close_to_reference(*_ours_and_reference_unet(loaded, reference.unet, TINY_SD2.unet.context_dim))
    tokens = _tokens(TINY_SD2.conditioner.vocab_size)
    with torch.no_grad():
        # diffusers keeps SD 2's text encoder without its last layer, whose output SD 2 never reads.
        assert_close_to_reference(loaded.model.condition_encoder(tokens), reference.text_encoder(tokens).last_hidden_state)


# kohya's SDXL trainer names UNet layers as the original (sgm) files do.
SGM_UNET_LAYERS = re.compile(r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|"
                             r"in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)$")


def test_sdxl_lora_with_original_unet_names_and_two_text_encoders_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    checkpoint = write_checkpoint(TINY_SDXL, tmp_path / "xl.safetensors")
    reference = _reference(StableDiffusionXLPipeline, sdxl_components(diffusers_folder(checkpoint, tmp_path / "d")))
    ours_before = load_checkpoint(checkpoint)
    unet_layers = layers(ours_before.model.unet, SGM_UNET_LAYERS)
    assert any(name.startswith("output_blocks") and "in_layers" in name for name in unet_layers)
    path = tmp_path / "lora.safetensors"
    save_safetensors({**kohya_lora(unet_layers, "lora_unet_"),
                      **kohya_lora(layers(reference.text_encoder, TEXT_LAYERS), "lora_te1_", seed=1),
                      **kohya_lora(layers(reference.text_encoder_2, TEXT_LAYERS), "lora_te2_", seed=2)}, path)
    _fuse(reference, path, 0.9, 0.5, text_encoders=("text_encoder", "text_encoder_2"))
    loaded = _merge(checkpoint, path, 0.9, 0.5)

    generator = torch.Generator().manual_seed(3)
    pooled = torch.randn(1, 64, generator=generator)
    sizes = dict(original_size=torch.tensor([[32.0, 32.0]]), crop_coords_top_left=torch.tensor([[0.0, 0.0]]),
                 target_size=torch.tensor([[32.0, 32.0]]))
    with torch.no_grad():
        y = loaded.model.condition_encoder.vector(pooled, sizes)
    added = dict(text_embeds=pooled, time_ids=torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]))
    assert_close_to_reference(*_ours_and_reference_unet(loaded, reference.unet, TINY_SDXL.unet.context_dim, y, added))
    tokens = _tokens(49408)
    with torch.no_grad():
        for ours, theirs in zip(loaded.model.condition_encoder.text_encoders,
                                (reference.text_encoder, reference.text_encoder_2)):
            assert_close_to_reference(ours(tokens), theirs(tokens, output_hidden_states=True).hidden_states[-2])
