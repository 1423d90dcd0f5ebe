"""Original <-> diffusers layout conversion, with diffusers' own converters and loaders as the oracle."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from checkpoint_tiny import TINY_SD1, TINY_SD2, TINY_X4, compvis_file_state_dict, random_weights
from conftest import assert_close_to_reference
from latent_diffusion.checkpoints.diffusers_configs import unet_config, vae_config
from latent_diffusion.checkpoints.convert import (
    load_diffusers_folder, save_diffusers_folder, save_single_file,
    to_diffusers,
)
from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.checkpoints.load import load_checkpoint, load_state_dict_into_model
from latent_diffusion.config import LDM_INPAINT, SD1

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
TINY_SD1_INPAINT = dataclasses.replace(
    TINY_SD1, family="sd1-inpaint", conditioning="hybrid", unet=dataclasses.replace(TINY_SD1.unet, in_channels=9))


def _assert_same_tensors(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("spec", [TINY_SD1, TINY_SD2, TINY_X4, TINY_SD1_INPAINT], ids=lambda s: s.family)
def test_unet_and_vae_names_match_the_diffusers_converter(spec):
    state = random_weights(spec)
    ours = to_diffusers(spec, state)
    theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(state, unet_config(spec))
    _assert_same_tensors(ours["unet"], theirs_unet)
    theirs_vae = single_file_utils.convert_ldm_vae_checkpoint(state, vae_config(spec))
    _assert_same_tensors(ours["vae"], theirs_vae)


def test_openai_clip_names_match_the_diffusers_converter():
    state = random_weights(TINY_SD1)
    _assert_same_tensors(to_diffusers(TINY_SD1, state)["text_encoder"],
                         single_file_utils.convert_ldm_clip_checkpoint(state))


def test_openclip_names_match_the_diffusers_converter():
    state = random_weights(TINY_SD2)
    ours = to_diffusers(TINY_SD2, state)
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=TINY_SD2.conditioner.width))
    theirs = single_file_utils.convert_open_clip_checkpoint(text_model, state)
    # diffusers drops the skipped last layer by its full-size name only (resblocks.23) and keeps the
    # projection, which a CLIPTextModel has no place for; we keep both aside in openclip_extras.
    last = TINY_SD2.conditioner.layers - 1
    theirs = {k: v for k, v in theirs.items()
              if not k.startswith(f"text_model.encoder.layers.{last}.") and k != "text_projection.weight"}
    _assert_same_tensors(ours["text_encoder"], theirs)
    assert set(ours["text_encoder/openclip_extras.safetensors"]) >= {"model.text_projection", "model.logit_scale"}


@pytest.mark.parametrize("spec", [TINY_SD1, TINY_SD2, TINY_X4], ids=lambda s: s.family)
def test_folder_round_trip_is_lossless(tmp_path, spec):
    loaded = load_state_dict_into_model(compvis_file_state_dict(spec, ema=False), spec=spec)
    save_diffusers_folder(loaded, tmp_path / "folder")
    back = load_diffusers_folder(tmp_path / "folder")
    assert back.spec.family == spec.family
    assert back.spec.unet == loaded.spec.unet and back.spec.autoencoder == loaded.spec.autoencoder
    assert back.spec.conditioner == loaded.spec.conditioner and back.spec.schedule == loaded.spec.schedule
    _assert_same_tensors(back.model.state_dict(), loaded.model.state_dict())
    single = save_single_file(back, tmp_path / "single.safetensors")
    again = load_checkpoint(single)
    _assert_same_tensors(again.model.state_dict(), loaded.model.state_dict())
    assert again.spec.schedule == loaded.spec.schedule


@pytest.mark.parametrize("spec", [TINY_SD1, TINY_SD2], ids=lambda s: s.family)
def test_our_folder_loads_in_diffusers_and_transformers(tmp_path, spec):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaded = load_state_dict_into_model(random_weights(spec), spec=spec)
    folder = save_diffusers_folder(loaded, tmp_path / "folder")
    model = loaded.model
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
        x, t = torch.randn(1, spec.unet.in_channels, 8, 8), torch.tensor([500])
        context = torch.randn(1, 5, spec.unet.context_dim)
        assert_close_to_reference(model.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample)

        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
        assert vae.config.scaling_factor == spec.scale_factor
        latent = torch.randn(1, spec.autoencoder.embed_dim, 4, 4)
        assert_close_to_reference(model.first_stage_model.decode(latent), vae.decode(latent).sample)

        text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
        tokens = torch.randint(0, spec.conditioner.vocab_size - 1, (2, spec.conditioner.context_length))
        assert_close_to_reference(model.cond_stage_model(tokens), text(tokens).last_hidden_state)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"


def test_folder_written_by_diffusers_and_transformers_loads(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = TINY_SD2
    reference = load_state_dict_into_model(random_weights(spec), spec=spec)
    ours_named = to_diffusers(spec, reference.model.state_dict())
    unet = UNet2DConditionModel(**{k: v for k, v in unet_config(spec).items() if not k.startswith("_")})
    unet.load_state_dict(ours_named["unet"])
    unet.save_pretrained(tmp_path / "unet")
    vae = AutoencoderKL(**{k: v for k, v in vae_config(spec).items() if not k.startswith("_")})
    vae.load_state_dict(ours_named["vae"])
    vae.save_pretrained(tmp_path / "vae")
    text_cfg = spec.conditioner
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.width, intermediate_size=4 * text_cfg.width,
        num_attention_heads=text_cfg.heads, num_hidden_layers=text_cfg.layers - 1,
        max_position_embeddings=text_cfg.context_length, hidden_act="gelu"))
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in ours_named["text_encoder"].items()}
                         if "embeddings.token_embedding.weight" in text.state_dict() else ours_named["text_encoder"])
    text.save_pretrained(tmp_path / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")

    loaded = load_diffusers_folder(tmp_path)
    assert loaded.spec.family == "sd2-v" and loaded.spec.prediction == "v"
    # A diffusers folder holds only the layers SD 2 runs; nothing is skipped any more.
    assert loaded.spec.conditioner.layers == text_cfg.layers - 1 and loaded.spec.conditioner.skip_last_layers == 0
    assert any("NaN" in reason for reason in loaded.set_aside)
    theirs = loaded.model.state_dict()
    for key, value in reference.model.state_dict().items():
        if key in theirs and not key.endswith(("text_projection", "logit_scale")):
            assert torch.equal(theirs[key], value), key
    tokens = torch.randint(0, text_cfg.vocab_size - 1, (1, text_cfg.context_length))
    with torch.no_grad():
        assert_close_to_reference(loaded.model.cond_stage_model(tokens), reference.model.cond_stage_model(tokens))


def test_unsupported_families_and_broken_folders_are_errors(tmp_path):
    tiny_inpaint = dataclasses.replace(
        LDM_INPAINT, unet=dataclasses.replace(LDM_INPAINT.unet, model_channels=32, channel_mult=(1, 2),
                                              num_res_blocks=1, attention_resolutions=(2,), num_heads=2),
        autoencoder=dataclasses.replace(LDM_INPAINT.autoencoder, ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16))
    loaded = load_state_dict_into_model(random_weights(tiny_inpaint), spec=tiny_inpaint)
    with pytest.raises(CheckpointError, match="cannot hold a 'ldm-inpaint'"):
        save_diffusers_folder(loaded, tmp_path / "x")
    with pytest.raises(CheckpointError, match="missing"):
        load_diffusers_folder(tmp_path)


@pytest.mark.slow
def test_full_size_sd15_round_trip_original_diffusers_original_is_bitwise(tmp_path):
    with torch.device("meta"):
        from latent_diffusion.models.ldm import LatentDiffusion
        shapes = LatentDiffusion(SD1).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator, dtype=torch.float16) for k, v in shapes.items()}
    source = tmp_path / "sd15.safetensors"
    save_safetensors(state, source)
    loaded = load_checkpoint(source, dtype=torch.float16)
    ours = to_diffusers(loaded.spec, loaded.model.state_dict())
    # diffusers' converters agree with ours on the full-size key set too.
    assert sorted(ours["unet"]) == sorted(single_file_utils.convert_ldm_unet_checkpoint(
        state, unet_config(loaded.spec)))
    assert sorted(ours["text_encoder"]) == sorted(single_file_utils.convert_ldm_clip_checkpoint(state))
    del ours
    save_diffusers_folder(loaded, tmp_path / "folder")
    back = load_diffusers_folder(tmp_path / "folder", dtype="keep")
    assert back.spec.family == "sd1" and back.spec.unet == loaded.spec.unet
    save_single_file(back, tmp_path / "back.safetensors", include_schedule=False)
    again = load_checkpoint(tmp_path / "back.safetensors", dtype="keep").model.state_dict()
    assert sorted(again) == sorted(state)
    for key, value in state.items():
        assert torch.equal(again[key], value), key
