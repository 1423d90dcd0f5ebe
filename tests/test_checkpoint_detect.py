"""Family detection from keys and shapes, on synthetic state dicts built on the meta device."""
import dataclasses

import pytest
import torch

from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.config import (
    PRESETS, SD1, SD2, SD2_X4_UPSCALER, SDXL, SDXL_REFINER, AutoencoderConfig, BERTTextConfig, ClassEmbedderConfig,
    CLIPTextConfig, LDM_TEXT2IMG256, LDM_CIN256,
)
from latent_diffusion.families import FAMILIES, detect, get_family, read_features, shapes_of
from latent_diffusion.models.ldm import LatentDiffusion


def derive_spec(shapes, family, prediction=None):
    return family.with_prediction(prediction).derive_spec(shapes_of(shapes), prediction)


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
    assert detect(preset_shapes[name]).name == _registry_family(name)


def test_no_two_families_match_the_same_model(preset_shapes):
    for name, shapes in preset_shapes.items():
        features = read_features(shapes)
        matching = [family.name for family in FAMILIES if not family.mismatches(features)]
        assert matching == [_registry_family(name)], (name, matching)


def test_every_family_with_a_preset_is_named_after_it():
    for family in FAMILIES:
        if family.preset is not None:
            assert family.preset.family == family.name
            assert PRESETS[family.name] is family.preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_derived_spec_rebuilds_exactly_the_same_tensors(preset_shapes, name):
    shapes = preset_shapes[name]
    spec = derive_spec(shapes, detect(shapes), prediction=PRESETS[name].prediction)
    assert spec.family == name
    assert spec.prediction == PRESETS[name].prediction
    assert shapes_of(meta_state_dict(spec)) == shapes
    expected = PRESETS[name]
    for field in ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                  "context_dim", "num_classes", "use_linear_in_transformer", "resblock_updown",
                  "use_spatial_transformer", "disable_self_attentions", "num_heads", "num_head_channels",
                  "transformer_depth", "transformer_depth_middle", "adm_in_channels"):
        assert getattr(spec.unet, field) == getattr(expected.unet, field), field
    assert spec.autoencoder == expected.autoencoder
    assert spec.conditioner == expected.conditioner


def test_sd2_defaults_to_eps_and_prediction_override_selects_v(preset_shapes):
    detection = detect(preset_shapes["sd2-v"])
    assert "eps is assumed" in detection.description
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


def test_full_size_sdxl_parameter_counts_match_the_reference_numbers():
    from latent_diffusion.config import OPENCLIP_BIGG
    from latent_diffusion.models.text_encoders import CLIPTextEncoder

    with torch.device("meta"):
        base = LatentDiffusion(SDXL).component_parameter_counts()
        refiner = LatentDiffusion(SDXL_REFINER).component_parameter_counts()
        bigg = CLIPTextEncoder(OPENCLIP_BIGG)
    assert base["unet"] == 2_567_463_684 and refiner["unet"] == 2_259_526_660
    assert base["vae"] == refiner["vae"] == 83_653_863
    # The text model with its projection; OpenCLIP's logit scale is one more (unused) number.
    assert sum(p.numel() for name, p in bigg.named_parameters() if "logit_scale" not in name) == 694_659_840
    assert base["cond"] == 694_659_841 + 123_060_480 and refiner["cond"] == 694_659_841


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
    derived = derive_spec(meta_state_dict(spec), detect(meta_state_dict(spec)))
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
    assert derive_spec(shapes, detect(shapes)).conditioner == bert.conditioner
    classes = dataclasses.replace(
        LDM_CIN256, conditioner=ClassEmbedderConfig(n_classes=10, embed_dim=64),
        unet=dataclasses.replace(LDM_CIN256.unet, model_channels=64, channel_mult=(1, 2), context_dim=64),
    )
    shapes = meta_state_dict(classes)
    assert derive_spec(shapes, detect(shapes)).conditioner == classes.conditioner


def test_x4_upscaler_self_attention_flags_come_from_shapes(preset_shapes):
    shapes = preset_shapes["sd2-x4-upscaler"]
    spec = derive_spec(shapes, detect(shapes))
    assert spec.unet.disable_self_attentions == SD2_X4_UPSCALER.unet.disable_self_attentions


def test_unknown_architecture_names_the_closest_family(preset_shapes):
    shapes = dict(preset_shapes["sd1"])
    # An SD 1 UNet with 8 input channels exists in no family.
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"unknown architecture.*Closest is 'sd1'.*concat_channels=4"):
        detect(shapes)


def test_partial_and_foreign_files_get_clear_errors(preset_shapes):
    vae_only = {k[len("first_stage_model."):]: v for k, v in preset_shapes["sd1"].items()
                if k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="stand-alone autoencoder"):
        detect(vae_only)
    with pytest.raises(CheckpointError, match="diffusers layout"):
        detect({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})
    with pytest.raises(CheckpointError, match="no UNet keys"):
        detect({"foo.weight": (3,)})


def test_forced_family_and_unknown_family_name(preset_shapes):
    assert detect(preset_shapes["sd1"], family="sd1").name == "sd1"
    assert detect(preset_shapes["sd2"], family="sd2-v").name == "sd2-v"
    with pytest.raises(CheckpointError, match="unknown family"):
        detect(preset_shapes["sd1"], family="sd3")


def test_sdxl_sizes_and_micro_conditions_are_read_from_the_shapes():
    spec = dataclasses.replace(
        SDXL,
        unet=dataclasses.replace(SDXL.unet, model_channels=32, channel_mult=(1, 2, 2), num_head_channels=8,
                                 transformer_depth=(0, 1, 3), transformer_depth_middle=None, context_dim=128,
                                 adm_in_channels=64 + 6 * 8),
        autoencoder=AutoencoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1),
        conditioner=dataclasses.replace(
            SDXL.conditioner, fourier_dim=8,
            text_encoders=tuple(dataclasses.replace(e, width=64, layers=2, heads=1)
                                for e in SDXL.conditioner.text_encoders)),
    )
    shapes = meta_state_dict(spec)
    assert detect(shapes).name == "sdxl"
    derived = derive_spec(shapes, detect(shapes))
    # Head widths are not in the shapes: they come from the preset.
    assert derived.unet == dataclasses.replace(spec.unet, num_head_channels=64)
    assert derived.unet.transformer_depth_middle == 3 and derived.conditioner.fourier_dim == 8
    assert derived.conditioner.text_encoders == spec.conditioner.text_encoders


def test_sdxl_with_a_missing_or_mis_shaped_embedder_is_refused(preset_shapes):
    base = dict(preset_shapes["sdxl"])
    without_bigg = {k: v for k, v in base.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(CheckpointError, match=r"Closest is 'sdxl'.*embedders=\('clip-openai',\)"):
        detect(without_bigg)
    # An SD 2 text tower (ViT-H, 1024 wide) where bigG (1280) belongs.
    narrow = {k: (v[:-1] + (1024,) if v and v[-1] == 1280 and k.startswith("conditioner.embedders.1.") else v)
              for k, v in base.items()}
    narrow = {k: ((1024,) + v[1:] if v and v[0] == 1280 and k.startswith("conditioner.embedders.1.") else v)
              for k, v in narrow.items()}
    with pytest.raises(CheckpointError, match=r"1792-wide context .* cross-attends to 2048"):
        derive_spec(narrow, detect(narrow))


def test_sdxl_parts_are_named_as_diffusers_names_them():
    assert [part.name for part in get_family("sdxl").components(SDXL)] == [
        "unet", "vae", "text_encoder", "text_encoder_2"]
    refiner_text = get_family("sdxl-refiner").components(SDXL_REFINER)[2:]
    assert [(part.name, part.prefix) for part in refiner_text] == [("text_encoder_2", "conditioner.embedders.0.")]
