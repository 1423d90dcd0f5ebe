"""A LoRA (attention layers and 3x3 "LoCon" convolutions) on a full-size SD 1.5 UNet and CLIP
text encoder with random weights, in kohya's layout and in diffusers' PEFT one: our merge against
diffusers' ``load_lora_into_unet`` + ``fuse_lora``.

The diffusers networks are built on the meta device and given our very tensors (renamed views), so
the two sides share one copy of the weights; ours is computed first, as diffusers fuses in place.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from conftest import assert_close_to_reference
from latent_diffusion.addons.lora_file import read_lora_file
from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
from latent_diffusion.checkpoints import diffusers_configs as configs
from latent_diffusion.checkpoints.convert import to_diffusers
from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.config import SD1
from latent_diffusion.families import get_family
from latent_diffusion.models.ldm import DiffusionModelSlot
from latent_diffusion.models.text_encoders import CLIPTextEncoder
from latent_diffusion.models.unet import UNetModel
from lora_tiny import TEXT_LAYERS, kohya_lora, layers, peft_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ATTENTION_AND_LOCON = re.compile(r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|"
                                 r"(down_blocks\.3|mid_block)\.resnets\.\d+\.conv1)$")


def _random(module: nn.Module, seed: int) -> nn.Module:
    """``module`` built on the meta device, then given random weights (no init pass over 860M parameters)."""
    generator = torch.Generator().manual_seed(seed)
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02 if parameter.dim() > 1 else 0.1, generator=generator)
    return module


class _Model(nn.Module):
    """Our networks under the keys a single file has them."""

    def __init__(self, unet=None, text=None):
        super().__init__()
        if unet is not None:
            self.model = DiffusionModelSlot(unet)
        if text is not None:
            self.cond_stage_model = text


def _diffusers_twin(ours: _Model, component: str, make: callable) -> nn.Module:
    """The diffusers / transformers network of ``component`` holding views of our tensors."""
    tensors = to_diffusers(SD1, dict(ours.state_dict()))[component]
    with torch.device("meta"):
        twin = make()
    expected = set(twin.state_dict())
    if component == "text_encoder" and not any(k.startswith("text_model.") for k in expected):
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}  # transformers 5's names
    twin.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=True, assign=True)
    for name, buffer in list(twin.named_buffers()):
        if buffer.is_meta:  # transformers' position ids, which no file holds
            assert name.endswith("position_ids"), name
            owner = twin.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return twin.eval()


def _merge_ours(model: _Model, path, unet: float, text: float) -> None:
    changed, warnings = MergedLoras(model, get_family("sd1"), SD1).apply([LoraUse(read_lora_file(path), unet, text)])
    assert changed and not warnings


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_full_size_sd15_unet_lora_and_locon_match_diffusers(tmp_path, layout):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNetModel(SD1.unet)
    ours = _Model(unet=_random(unet, 0).eval())
    twin = _diffusers_twin(ours, "unet", lambda: UNet2DConditionModel(**configs.unet_config(SD1)))
    path = tmp_path / "full.safetensors"
    adapted = layers(twin, ATTENTION_AND_LOCON)
    save_safetensors(kohya_lora(adapted, "lora_unet_", rank=8, scale=0.05) if layout == "kohya"
                     else peft_lora(adapted, "unet.", rank=8, scale=0.05), path)

    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 768, generator=generator)
    t = torch.tensor([601])
    _merge_ours(ours, path, 1.0, 1.0)
    with torch.no_grad():
        mine = ours.model.diffusion_model(x, t, context)
    del ours, unet

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=twin)
    twin.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        theirs = twin(x, t, encoder_hidden_states=context).sample
    assert_close_to_reference(mine, theirs)


def test_full_size_sd15_text_encoder_lora_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        text = CLIPTextEncoder(SD1.conditioner)
    ours = _Model(text=_random(text, 2).eval())
    twin = _diffusers_twin(ours, "text_encoder",
                           lambda: CLIPTextModel(CLIPTextConfig(**configs.text_config(SD1.conditioner))))
    path = tmp_path / "text.safetensors"
    save_safetensors(kohya_lora(layers(twin, TEXT_LAYERS), "lora_te_", rank=8, scale=0.05), path)
    tokens = torch.randint(1, 49000, (1, 77), generator=torch.Generator().manual_seed(3))
    tokens[0, 0], tokens[0, 30] = 49406, 49407

    _merge_ours(ours, path, 1.0, 0.7)
    with torch.no_grad():
        mine = ours.cond_stage_model(tokens)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=twin, prefix="text_encoder",
                                                        lora_scale=0.7)
    for module in twin.modules():  # the scale was set as the layers were loaded
        if isinstance(module, BaseTunerLayer):
            module.merge()
    with torch.no_grad():
        theirs = twin(tokens).last_hidden_state
    assert_close_to_reference(mine, theirs)
