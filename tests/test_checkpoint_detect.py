"""Family detection from keys and shapes, on synthetic state dicts built on the meta device."""
import dataclasses

import pytest
import torch

from latent_diffusion.checkpoints.detect import VARIANTS, derive_spec, detect_family, read_features, shapes_of
from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.config import (
    PRESETS, SD1, SD2, SD2_X4_UPSCALER, AutoencoderConfig, BERTTextConfig, ClassEmbedderConfig, CLIPTextConfig,
    LDM_TEXT2IMG256, LDM_CIN256,
)
from latent_diffusion.models.ldm import LatentDiffusion


def meta_state_dict(spec):
    with torch.device("meta"):
        return LatentDiffusion(spec).state_dict()


@pytest.fixture(scope="module")
def preset_shapes():
    return {name: shapes_of(meta_state_dict(spec)) for name, spec in PRESETS.items()}


def _registry_family(name):
    return "sd2" if name == "sd2-v" else name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_detected_as_its_family(preset_shapes, name):
    assert detect_family(preset_shapes[name]).family == _registry_family(name)


def test_no_two_registry_entries_match_the_same_model(preset_shapes):
    for name, shapes in preset_shapes.items():
        features = read_features(shapes)
        matching = [v.family for v in VARIANTS if not v.mismatches(features)]
        assert matching == [_registry_family(name)], (name, matching)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_derived_spec_rebuilds_exactly_the_same_tensors(preset_shapes, name):
    shapes = preset_shapes[name]
    spec = derive_spec(shapes, detect_family(shapes), prediction=PRESETS[name].prediction)
    assert spec.family == name
    assert spec.prediction == PRESETS[name].prediction
    assert shapes_of(meta_state_dict(spec)) == shapes
    expected = PRESETS[name]
    for field in ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                  "context_dim", "num_classes", "use_linear_in_transformer", "resblock_updown",
                  "use_spatial_transformer", "disable_self_attentions", "num_heads", "num_head_channels"):
        assert getattr(spec.unet, field) == getattr(expected.unet, field), field
    assert spec.autoencoder == expected.autoencoder
    assert spec.conditioner == expected.conditioner


def test_sd2_defaults_to_eps_and_prediction_override_selects_v(preset_shapes):
    detection = detect_family(preset_shapes["sd2-v"])
    assert "eps is assumed" in detection.variant.description
    assert derive_spec(preset_shapes["sd2-v"], detection).prediction == "eps"
    v_spec = derive_spec(preset_shapes["sd2-v"], detection, prediction="v")
    assert v_spec.family == "sd2-v" and v_spec.prediction == "v"


def test_full_size_parameter_counts_match_the_reference_numbers():
    # MEASURED.md: reference parameter counts of the released networks.
    with torch.device("meta"):
        sd1 = LatentDiffusion(SD1).component_parameter_counts()
        sd2 = LatentDiffusion(SD2).component_parameter_counts()
    assert sd1 == {"unet": 859_520_964, "vae": 83_653_863, "cond": 123_060_480}
    assert sd2["unet"] == 865_910_724


def test_non_preset_sizes_are_read_from_the_shapes():
    spec = dataclasses.replace(
        SD1,
        unet=dataclasses.replace(SD1.unet, model_channels=64, channel_mult=(1, 3, 2), num_res_blocks=1,
                                 attention_resolutions=(2,), context_dim=128, transformer_depth=2,
                                 use_scale_shift_norm=True),
        autoencoder=AutoencoderConfig(kind="kl", embed_dim=3, z_channels=5, ch=32, ch_mult=(1, 2),
                                      num_res_blocks=1, attn_resolutions=(128,)),
        conditioner=dataclasses.replace(SD1.conditioner, width=128, layers=3, heads=2, context_length=20,
                                        vocab_size=1000),
    )
    derived = derive_spec(meta_state_dict(spec), detect_family(meta_state_dict(spec)))
    assert derived.unet == spec.unet
    assert derived.autoencoder == spec.autoencoder
    assert derived.conditioner == spec.conditioner


def test_non_preset_ldm_text_and_class_encoders():
    bert = dataclasses.replace(
        LDM_TEXT2IMG256, conditioner=BERTTextConfig(vocab_size=300, max_seq_len=16, n_embed=64, n_layer=2,
                                                    heads=8, dim_head=16, ff_mult=2),
        unet=dataclasses.replace(LDM_TEXT2IMG256.unet, model_channels=64, channel_mult=(1, 2),
                                 attention_resolutions=(1, 2), context_dim=64),
    )
    shapes = meta_state_dict(bert)
    assert derive_spec(shapes, detect_family(shapes)).conditioner == bert.conditioner
    classes = dataclasses.replace(
        LDM_CIN256, conditioner=ClassEmbedderConfig(n_classes=10, embed_dim=64),
        unet=dataclasses.replace(LDM_CIN256.unet, model_channels=64, channel_mult=(1, 2), context_dim=64),
    )
    shapes = meta_state_dict(classes)
    assert derive_spec(shapes, detect_family(shapes)).conditioner == classes.conditioner


def test_x4_upscaler_self_attention_flags_come_from_shapes(preset_shapes):
    shapes = preset_shapes["sd2-x4-upscaler"]
    spec = derive_spec(shapes, detect_family(shapes))
    assert spec.unet.disable_self_attentions == SD2_X4_UPSCALER.unet.disable_self_attentions


def test_unknown_architecture_names_the_closest_family(preset_shapes):
    shapes = dict(preset_shapes["sd1"])
    # An SD 1 UNet with 8 input channels exists in no family.
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"unknown architecture.*Closest is 'sd1'.*concat_channels=4"):
        detect_family(shapes)


def test_partial_and_foreign_files_get_clear_errors(preset_shapes):
    vae_only = {k[len("first_stage_model."):]: v for k, v in preset_shapes["sd1"].items()
                if k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="stand-alone autoencoder"):
        detect_family(vae_only)
    with pytest.raises(CheckpointError, match="diffusers layout"):
        detect_family({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})
    with pytest.raises(CheckpointError, match="no UNet keys"):
        detect_family({"foo.weight": (3,)})


def test_forced_family_and_unknown_family_name(preset_shapes):
    assert detect_family(preset_shapes["sd1"], family="sd1").family == "sd1"
    assert detect_family(preset_shapes["sd2"], family="sd2-v").family == "sd2"
    with pytest.raises(CheckpointError, match="unknown family"):
        detect_family(preset_shapes["sd1"], family="sdxl")
