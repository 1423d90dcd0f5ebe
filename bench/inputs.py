"""The inputs every side of a benchmark gets: the same seeded tensors, built the same way."""
from __future__ import annotations

import torch

from bench.cases import Case

PROMPT = "a photograph of an astronaut riding a horse on the moon"
SEED = 1234


def unet_inputs(case: Case, spec, device, dtype):
    generator = torch.Generator().manual_seed(SEED)
    side = case.size
    x = torch.randn(2, spec.latent_channels, side, side, generator=generator)
    context = torch.randn(2, 77, spec.unet.context_dim, generator=generator)
    t = torch.tensor([500.0, 500.0])
    return x.to(device, dtype), t.to(device), context.to(device, dtype)


def adm_inputs(spec, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL's vector input as both sides take it: (our y, diffusers' pooled text, diffusers' time ids)."""
    from latent_diffusion.nn.layers import timestep_embedding

    conditioner = spec.conditioner
    generator = torch.Generator().manual_seed(SEED + 1)
    pooled = torch.randn(2, conditioner.text_encoders[conditioner.pooled_from].width, generator=generator)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2)
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), conditioner.fourier_dim).reshape(2, -1)], dim=1)
    return y.to(device, dtype), pooled.to(device, dtype), time_ids.to(device, dtype)


def vae_latents(case: Case, spec) -> torch.Tensor:
    """Scaled latents of a case's image size (what the sampler hands the decoder)."""
    generator = torch.Generator().manual_seed(SEED)
    side = case.size // spec.downsampling_factor
    return torch.randn(1, spec.latent_channels, side, side, generator=generator)
