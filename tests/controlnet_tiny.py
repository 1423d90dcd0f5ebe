"""Tiny random-weight ControlNets for the tiny models of pipeline_tiny, and their diffusers twins."""
from __future__ import annotations

import torch
from torch import nn

from latent_diffusion.models.controlnet import ControlNet, controlnet_config_for
from pipeline_tiny import TINY_UNET

# The tiny VAE downsamples by 4, so the hint encoder halves twice.
TINY_HINT_WIDTHS = (16, 32, 64)
TINY_CONTROLNET = controlnet_config_for(TINY_UNET, hint_widths=TINY_HINT_WIDTHS)


def randomize(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """Random values for the zero-initialised weights and biases (zero convolutions would hide every bug)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and tensor.abs().max() == 0:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return module


def random_controlnet(config=TINY_CONTROLNET, seed: int = 0) -> ControlNet:
    torch.manual_seed(seed)
    return randomize(ControlNet(config), seed).eval()


def diffusers_controlnet_config(config) -> dict:
    """diffusers ControlNetModel arguments for one of our ControlNet configs (SD 1.x layout)."""
    unet = config.unet
    widths = [unet.model_channels * m for m in unet.channel_mult]
    attends = [2**level in unet.attention_resolutions for level in range(len(widths))]
    return dict(in_channels=unet.in_channels, block_out_channels=widths, layers_per_block=unet.num_res_blocks,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
                cross_attention_dim=unet.context_dim, attention_head_dim=unet.num_heads,
                conditioning_embedding_out_channels=list(config.hint_widths))


def diffusers_twin(model: ControlNet):
    """diffusers' ControlNetModel with our ControlNet's weights, named by diffusers' own converter."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    arguments = diffusers_controlnet_config(model.control_config)
    state = {f"control_model.{k}": v for k, v in model.state_dict().items()}
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": arguments["layers_per_block"]})
    # The converter takes the release's four hint widths for granted (input_hint_block.14 is conv_out).
    last = 4 * len(model.control_config.hint_widths) - 2  # two convolutions per width, numbered 0, 2, ...
    if last != 14:
        for leaf in ("weight", "bias"):
            del converted[f"controlnet_cond_embedding.blocks.{last // 2 - 1}.{leaf}"]
            converted[f"controlnet_cond_embedding.conv_out.{leaf}"] = state[f"control_model.input_hint_block.{last}.{leaf}"]
    with torch.device("meta"):
        twin = ControlNetModel(**arguments)
    twin.load_state_dict(converted, strict=True, assign=True)
    return twin.eval()
