"""The stage-2 regression problem: what the network sees and what it must output, per noised latent.

Each parameterisation (eps, v, x0) is defined once, by the denoiser's scalings: the network sees
``c_in * x`` for ``x = x0 + sigma * noise``, and its target is the output ``F`` for which the denoiser
``c_skip * x + c_out * F`` returns ``x0`` exactly. Sampling and training therefore cannot disagree.
"""
from __future__ import annotations

import torch

from latent_diffusion.diffusion.denoiser import prediction_scalings
from latent_diffusion.diffusion.schedules import alpha_bar_to_sigma


def network_input_and_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor,
                             alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, regression target) for clean latents ``x0`` [B, ...] noised by ``noise`` to ``alpha_bar`` [B].

    Computed in float64 (float32 on MPS, which lacks it): the eps target ``(x0 - x) / -sigma`` cancels
    almost all of ``x0`` at small sigma, which float32 would leave with errors of ~1e-6.
    """
    dtype = torch.float32 if x0.device.type == "mps" else torch.float64
    sigma = alpha_bar_to_sigma(alpha_bar.to(dtype)).view(-1, *[1] * (x0.ndim - 1))
    c_skip, c_out, c_in = prediction_scalings(prediction, sigma)
    clean = x0.to(dtype)
    x = clean + sigma * noise.to(dtype)
    target = (clean - c_skip * x) / c_out
    return (c_in * x).to(x0.dtype), target.to(x0.dtype)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) expressed for each prediction target."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped
