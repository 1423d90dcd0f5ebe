"""SD 1.5's ControlNet at full size with random weights, against diffusers.

diffusers' single-file converter names the original-layout tensors, so the key mapping is checked
by an independent implementation; the reference models hold the very same tensors (``assign``), so
one copy of each network is in memory at a time (the ControlNet, then the UNet: at most ~3.5 GiB).
"""
from __future__ import annotations

import gc

import pytest
import torch
from conftest import assert_close_to_reference
from test_sdxl_full_size import needs_memory
from test_unet import randomize_

from latent_diffusion.checkpoints.controlnet import CONTROL_PREFIX, load_controlnet
from latent_diffusion.checkpoints.io import read_state_dict, save_safetensors
from latent_diffusion.config import SD1
from latent_diffusion.models.controlnet import ControlNet, controlnet_config_for
from latent_diffusion.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
# diffusers' ControlNetModel with its defaults but SD 1.5's 768-wide text (the released SD 1.5 ControlNets' config).
SD15_CONTROLNET_PARAMETERS = 361_279_120


def test_sd15_controlnet_parameter_count_is_diffusers_default():
    from diffusers import ControlNetModel

    with torch.device("meta"):
        ours = ControlNet(controlnet_config_for(SD1.unet))
        theirs = ControlNetModel(cross_attention_dim=768)
    assert sum(p.numel() for p in ours.parameters()) == SD15_CONTROLNET_PARAMETERS
    assert sum(p.numel() for p in theirs.parameters()) == SD15_CONTROLNET_PARAMETERS


def _write_release_files(folder):
    """A random SD 1.5 ControlNet as released: control_model.* in fp16, .safetensors and .pth."""
    with torch.device("meta"):
        model = ControlNet(controlnet_config_for(SD1.unet))
    model = randomize_(model.to_empty(device="cpu"), seed=11)
    state = {CONTROL_PREFIX + k: v.half() for k, v in model.state_dict().items()}
    del model
    save_safetensors(state, folder / "control_v11p_sd15_canny.safetensors")
    torch.save(state, folder / "control_v11p_sd15_canny.pth")
    return folder / "control_v11p_sd15_canny.safetensors", folder / "control_v11p_sd15_canny.pth"


@pytest.mark.slow
@needs_memory(6)
@torch.no_grad()
def test_full_size_sd15_controlnet_and_controlled_unet_match_diffusers(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from latent_diffusion.checkpoints.convert import to_diffusers
    from latent_diffusion.checkpoints.diffusers_configs import unet_config

    safetensors_path, pth_path = _write_release_files(tmp_path)
    from_pth = load_controlnet(pth_path, dtype=None)  # through the weights-only pickle loader
    stored = read_state_dict(safetensors_path)
    assert from_pth.family == "sd1" and from_pth.layout == "original"
    for key, value in from_pth.model.state_dict().items():
        assert torch.equal(value, stored[CONTROL_PREFIX + key]), key
    del from_pth, stored
    gc.collect()

    ours = load_controlnet(safetensors_path)  # strict: every tensor placed, none missing
    assert sum(p.numel() for p in ours.model.parameters()) == SD15_CONTROLNET_PARAMETERS
    converted = convert_controlnet_checkpoint(
        {CONTROL_PREFIX + k: v for k, v in ours.model.state_dict().items()}, {"layers_per_block": 2})
    with torch.device("meta"):
        reference = ControlNetModel(cross_attention_dim=768)
    reference.load_state_dict(converted, strict=True, assign=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=generator)
    hint = torch.rand(1, 3, 256, 256, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    t = torch.tensor([421.0])
    residuals = ours.model(x, hint, t, context)
    down, mid = reference.eval()(x, t, context, hint, return_dict=False)
    for mine, theirs in zip(residuals, [*down, mid], strict=True):
        assert_close_to_reference(mine, theirs)
    del ours, converted, reference
    gc.collect()

    with torch.device("meta"):
        unet = UNetModel(SD1.unet)
    unet = randomize_(unet.to_empty(device="cpu"), seed=12).eval()
    named = to_diffusers(SD1, {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})["unet"]
    with torch.device("meta"):
        twin = UNet2DConditionModel(**{k: v for k, v in unet_config(SD1).items() if not k.startswith("_")})
    twin.load_state_dict(named, strict=True, assign=True)
    controlled = unet(x, t, context, control=residuals)
    expected = twin.eval()(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert_close_to_reference(controlled, expected)
    assert (controlled - unet(x, t, context)).abs().max() > 0.01 * expected.abs().max()
