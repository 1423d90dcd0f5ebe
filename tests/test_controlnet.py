"""The ControlNet model and its files: residuals and the controlled UNet against diffusers'
ControlNetModel + UNet2DConditionModel (same random weights, diffusers' own converter naming them),
strict loading of the layouts users have, and clear refusals."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from latent_diffusion.checkpoints.controlnet import (
    CONTROL_PREFIX, check_controlnet_fits, describe_controlnet, is_controlnet, load_controlnet, save_controlnet,
)
from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.config import SD1, SD2
from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.models.unet import UNetModel
from controlnet_tiny import TINY_CONTROLNET, diffusers_twin, random_controlnet, randomize
from pipeline_tiny import TINY_SD1, TINY_UNET

diffusers = pytest.importorskip("diffusers")


def _inputs(config, batch=2, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    unet = config.unet
    x = torch.randn(batch, unet.in_channels, size, size, generator=generator)
    hint = torch.rand(batch, config.hint_channels, size * config.hint_factor, size * config.hint_factor,
                      generator=generator)
    context = torch.randn(batch, 7, unet.context_dim, generator=generator)
    return x, hint, torch.tensor([999.0, 311.5][:batch]), context


def _close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-4) -> None:
    scale = theirs.abs().max()
    assert scale > 0
    assert (ours - theirs).abs().max() <= tolerance * scale, ((ours - theirs).abs().max(), scale)


def test_residuals_and_controlled_unet_match_diffusers():
    from diffusers import UNet2DConditionModel

    from latent_diffusion.checkpoints.convert import to_diffusers
    from latent_diffusion.checkpoints.diffusers_configs import unet_config

    controlnet = random_controlnet()
    x, hint, t, context = _inputs(TINY_CONTROLNET)
    with torch.no_grad():
        ours = controlnet(x, hint, t, context)
        down, mid = diffusers_twin(controlnet)(x, t, context, hint, return_dict=False)
    assert len(ours) == len(down) + 1 == 5
    for mine, theirs in zip(ours, [*down, mid]):
        _close(mine, theirs)

    unet = randomize(UNetModel(TINY_UNET), seed=3).eval()
    spec = dataclasses.replace(TINY_SD1, unet=TINY_UNET)
    with torch.device("meta"):
        twin = UNet2DConditionModel(**{k: v for k, v in unet_config(spec, 8).items() if not k.startswith("_")})
    twin.load_state_dict(to_diffusers(spec, {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})["unet"],
                         assign=True)
    with torch.no_grad():
        controlled = unet(x, t, context, control=ours)
        reference = twin(x, t, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        plain = unet(x, t, context)
    _close(controlled, reference)
    assert (controlled - plain).abs().max() > 0.1 * plain.abs().max()  # the residuals matter


def test_unet_control_none_is_the_plain_unet_and_bad_residuals_are_named():
    unet = randomize(UNetModel(TINY_UNET), seed=1).eval()
    x, _hint, t, context = _inputs(TINY_CONTROLNET)
    with torch.no_grad():
        plain = unet(x, t, context)
        assert torch.equal(unet(x, t, context, control=None), plain)
        zeros = random_controlnet()(x, _hint, t, context)
        assert torch.equal(unet(x, t, context, control=[torch.zeros_like(r) for r in zeros]), plain)
        with pytest.raises(ValueError, match="5 residuals"):
            unet(x, t, context, control=zeros[:-1])
        with pytest.raises(ValueError, match="residual 2 .* does not fit"):
            unet(x, t, context, control=[r[..., :3] if i == 2 else r for i, r in enumerate(zeros)])


def test_hint_of_the_wrong_size_is_named():
    x, hint, t, context = _inputs(TINY_CONTROLNET)
    with pytest.raises(ValueError, match=r"control image must be shaped \[2, 3, 32, 32\]"):
        random_controlnet()(x, hint[..., :16, :16], t, context)


@pytest.mark.parametrize("prefixed", [True, False])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_layout_loads_strictly_without_metadata(tmp_path, prefixed, suffix):
    controlnet = random_controlnet(seed=4)
    prefix = CONTROL_PREFIX if prefixed else ""
    state = {prefix + k: v.half() for k, v in controlnet.state_dict().items()}
    path = tmp_path / f"control_tiny{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_safetensors(state, path)
    assert is_controlnet(path)
    loaded = load_controlnet(path)
    assert loaded.config == TINY_CONTROLNET  # every size read from the shapes
    assert loaded.layout == "original" and loaded.family is None
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value.half().float())
    assert loaded.title == f"control_tiny [{loaded.hash}]" and len(loaded.hash) == 8


def test_controlnet_1_0_files_set_the_base_model_aside_and_strangers_are_refused(tmp_path):
    controlnet = random_controlnet()
    state = {CONTROL_PREFIX + k: v for k, v in controlnet.state_dict().items()}
    save_safetensors({**state, "model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "full.safetensors")
    loaded = load_controlnet(tmp_path / "full.safetensors")
    assert loaded.set_aside == {"the base model the ControlNet was trained with": ["model.diffusion_model.out.2.bias"]}
    save_safetensors({**state, "lora_unet_x.alpha": torch.ones(())}, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="lora_unet_x.alpha"):
        load_controlnet(tmp_path / "odd.safetensors")
    del state[CONTROL_PREFIX + "zero_convs.3.0.weight"]
    save_safetensors(state, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="missing: zero_convs.3.0.weight"):
        load_controlnet(tmp_path / "cut.safetensors")


def test_our_files_keep_their_config_and_a_yaml_states_pooling(tmp_path):
    config = dataclasses.replace(TINY_CONTROLNET, hint_channels=1)
    path = save_controlnet(random_controlnet(config), tmp_path / "ours.safetensors")
    assert load_controlnet(path).config == config
    (tmp_path / "ours.yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n        global_average_pooling: true\n")
    assert load_controlnet(path).config.global_average_pooling


def test_diffusers_folder_loads_with_the_same_residuals(tmp_path):
    controlnet = random_controlnet(seed=5)
    diffusers_twin(controlnet).save_pretrained(tmp_path / "cn")
    assert is_controlnet(tmp_path / "cn")
    loaded = load_controlnet(tmp_path / "cn")
    assert loaded.layout == "diffusers" and loaded.config == TINY_CONTROLNET
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_difference_controlnet_adds_the_base_unet(tmp_path):
    controlnet = random_controlnet(seed=6)
    base = randomize(UNetModel(TINY_UNET), seed=7).state_dict()
    state = {CONTROL_PREFIX + k: (v - base[k] if k in base else v) for k, v in controlnet.state_dict().items()}
    save_safetensors({**state, "difference": torch.tensor(1.0)}, tmp_path / "diff.safetensors")
    with pytest.raises(CheckpointError, match="relative to a base model"):
        load_controlnet(tmp_path / "diff.safetensors")
    loaded = load_controlnet(tmp_path / "diff.safetensors", base_unet=base)
    assert loaded.layout == "difference"
    for key, value in controlnet.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_another_familys_controlnet_is_refused_by_name(tmp_path):
    config = dataclasses.replace(TINY_CONTROLNET, unet=dataclasses.replace(TINY_UNET, context_dim=768))
    path = save_controlnet(random_controlnet(config), tmp_path / "sd15_style.safetensors")
    loaded = load_controlnet(path)
    assert loaded.family == "sd1"
    check_controlnet_fits(loaded, dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, model_channels=32,
                          channel_mult=(1, 2), num_res_blocks=1)), "tiny")
    with pytest.raises(ValueError, match=r"'sd15_style' is an SD 1.x ControlNet and does not fit 'my-sd2', a 'sd2' "
                                         r"model \(SD 2.x\): they differ in model_channels, channel_mult, "
                                         r"num_res_blocks, context_dim"):
        check_controlnet_fits(loaded, SD2, "my-sd2")


def test_describe_names_kind_family_and_size(tmp_path):
    path = save_controlnet(random_controlnet(), tmp_path / "c.safetensors")
    description = describe_controlnet(path)
    assert description["kind"] == "controlnet" and description["layout"] == "original"
    assert description["parameters"] == sum(p.numel() for p in ControlNet(TINY_CONTROLNET).parameters())
    assert description["hint_factor"] == 4
    json.dumps(description)
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(save_safetensors({"x": torch.zeros(1)}, tmp_path / "x.safetensors") or tmp_path / "x.safetensors")


def test_ldm_info_names_a_controlnet_and_its_family(tmp_path, capsys):
    from latent_diffusion.cli import main

    config = dataclasses.replace(TINY_CONTROLNET, unet=dataclasses.replace(TINY_UNET, context_dim=768))
    state = {CONTROL_PREFIX + k: v.half() for k, v in random_controlnet(config).state_dict().items()}
    save_safetensors(state, tmp_path / "control_v11p_sd15_canny.safetensors")
    assert main(["info", str(tmp_path / "control_v11p_sd15_canny.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "kind:        SD 1.x ControlNet (original layout)" in out
    assert "family:      sd1" in out and "float16 x" in out
    assert main(["info", "--json", str(tmp_path / "control_v11p_sd15_canny.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sd1"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_configs_are_read_back_from_shapes_alone(family):
    from latent_diffusion.checkpoints.controlnet import config_from_shapes, controlnet_family
    from latent_diffusion.config import SDXL
    from latent_diffusion.models.controlnet import controlnet_config_for

    spec = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}[family]
    config = controlnet_config_for(spec.unet)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(config).state_dict().items()}
    derived = config_from_shapes(shapes)
    assert derived == config
    assert controlnet_family(derived.unet) == family


def test_diffusers_named_single_file_loads_from_its_shapes(tmp_path):
    controlnet = random_controlnet(seed=8)
    twin = diffusers_twin(controlnet)
    save_safetensors({k: v.contiguous() for k, v in twin.state_dict().items()}, tmp_path / "diffusers_tiny.safetensors")
    loaded = load_controlnet(tmp_path / "diffusers_tiny.safetensors")
    assert loaded.layout == "diffusers" and loaded.config == TINY_CONTROLNET
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_sdxl_controlnet_in_diffusers_names_maps_onto_ours_key_for_key():
    """diffusers' own SDXL ControlNetModel (controlnet-canny-sdxl-1.0's config), shapes only: every tensor
    finds its place in our SDXL ControlNet, whose config is read back from the shapes."""
    from diffusers import ControlNetModel

    from latent_diffusion.checkpoints.controlnet_diffusers import config_from_values, to_original, values_from_shapes
    from latent_diffusion.config import SDXL
    from latent_diffusion.models.controlnet import controlnet_config_for

    with torch.device("meta"):
        theirs = ControlNetModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    state = theirs.state_dict()
    config = config_from_values(values_from_shapes({k: tuple(v.shape) for k, v in state.items()}), "sdxl")
    assert config == controlnet_config_for(SDXL.unet)
    renamed = to_original(config, state, "sdxl")
    with torch.device("meta"):
        ours = ControlNet(config).state_dict()
    assert set(renamed) == set(ours)
    assert all(tuple(renamed[k].shape) == tuple(v.shape) for k, v in ours.items())
