"""Tiny model specs and CompVis-style single-file state dicts for the checkpoint tests."""
import dataclasses

import torch

from latent_diffusion.config import (
    LDM_INPAINT, SD1, SD2, SD2_X4_UPSCALER, AutoencoderConfig, ScheduleConfig,
)
from latent_diffusion.models.ldm import LatentDiffusion

TINY_VAE = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_UNET_SD1 = dataclasses.replace(SD1.unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(1, 2), context_dim=64)
TINY_SD1 = dataclasses.replace(
    SD1, unet=TINY_UNET_SD1, autoencoder=TINY_VAE,
    conditioner=dataclasses.replace(SD1.conditioner, vocab_size=1000, width=64, layers=2, heads=1),
)
TINY_SD2 = dataclasses.replace(
    SD2,
    unet=dataclasses.replace(SD2.unet, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(1, 2), context_dim=64),
    autoencoder=TINY_VAE,
    conditioner=dataclasses.replace(SD2.conditioner, vocab_size=1000, width=64, layers=3, heads=1),
)
TINY_X4 = dataclasses.replace(
    SD2_X4_UPSCALER,
    unet=dataclasses.replace(SD2_X4_UPSCALER.unet, model_channels=32, channel_mult=(1, 2, 2),
                             attention_resolutions=(2, 4), num_res_blocks=1, context_dim=128, num_heads=2,
                             disable_self_attentions=(True, True, False)),
    autoencoder=TINY_VAE,
    # Wider text than UNet features, so that disabled self-attention shows in the shapes.
    conditioner=dataclasses.replace(TINY_SD2.conditioner, width=128, heads=2),
)
TINY_LDM_INPAINT = dataclasses.replace(
    LDM_INPAINT,
    unet=dataclasses.replace(LDM_INPAINT.unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(2,), num_heads=2),
    autoencoder=dataclasses.replace(LDM_INPAINT.autoencoder, ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16),
)


def compvis_betas(schedule: ScheduleConfig) -> torch.Tensor:
    """Betas as CompVis ``make_beta_schedule('linear')`` computes them (float64)."""
    return torch.linspace(schedule.linear_start**0.5, schedule.linear_end**0.5, schedule.timesteps,
                          dtype=torch.float64) ** 2


def schedule_buffers(schedule: ScheduleConfig) -> dict[str, torch.Tensor]:
    """The buffers ``DDPM.register_schedule`` stores, as float32 like the reference."""
    betas = compvis_betas(schedule)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    values = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.float() for k, v in values.items()}


def random_weights(spec) -> dict[str, torch.Tensor]:
    """The network weights of ``spec``, randomly initialised (what ``LatentDiffusion.state_dict()`` holds)."""
    model = LatentDiffusion(spec)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def compvis_file_state_dict(spec, *, ema: bool = True, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """A state dict laid out like a released CompVis / SD single file: weights plus the extras."""
    state = random_weights(spec)
    state.update(schedule_buffers(spec.schedule))
    if ema:
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
        for key, value in list(state.items()):
            if key.startswith("model.diffusion_model."):
                state["model_ema." + key[len("model."):].replace(".", "")] = value + 1
    if position_ids and spec.conditioner is not None and getattr(spec.conditioner, "layout", None) == "openai":
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            spec.conditioner.context_length)[None]
    return state
