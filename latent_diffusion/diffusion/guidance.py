"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser around a denoiser."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from .denoiser import Conditioning, prediction_scalings

DenoiserFn = Callable[[Tensor, Tensor, "Conditioning | None"], Tensor]


def rescale_guidance(guided: Tensor, conditional: Tensor, x: Tensor, sigma: Tensor, amount: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4) applied to clean-latent estimates.

    The paper matches the standard deviation of the guided v-prediction to that of the conditional
    one, so the estimates are taken to v-space, rescaled there and brought back; for a v-model this is
    exactly diffusers' ``rescale_noise_cfg``.
    """
    sigma = sigma.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
    c_skip, c_out, _ = prediction_scalings("v", sigma)
    v_guided = (guided - c_skip * x) / c_out
    v_cond = (conditional - c_skip * x) / c_out
    dims = list(range(1, x.ndim))
    v_rescaled = v_guided * (v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True))
    v_mixed = amount * v_rescaled + (1 - amount) * v_guided
    return c_skip * x + c_out * v_mixed


class ClassifierFreeGuidance:
    """``D_uncond + scale * (D_cond - D_uncond)``, both from one batched call of the wrapped denoiser.

    ``uncond`` is the negative / unconditional conditioning; with batch size 1 it is repeated over the
    batch, and without an image (``concat``) it shares the conditional one's. With ``scale == 1`` the
    unconditional pass is skipped.
    """

    def __init__(self, denoiser: DenoiserFn, uncond: Conditioning, scale: float, rescale: float = 0.0) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.uncond = uncond
        self.scale = scale
        self.rescale = rescale

    def _uncond_for(self, cond: Conditioning, batch_size: int) -> Conditioning:
        fields = {}
        # Image conditioning is the same for both halves in the references; reuse it unless given.
        uncond = self.uncond if self.uncond.concat is not None else dataclasses.replace(self.uncond, concat=cond.concat)
        for name, value in uncond.tensors().items():
            if value.shape[0] == 1 and batch_size > 1:
                value = value.expand(batch_size, *value.shape[1:])
            elif value.shape[0] != batch_size:
                raise ValueError(f"unconditional {name!r} has batch {value.shape[0]}, expected 1 or {batch_size}")
            fields[name] = value
        return Conditioning(**fields)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        cond = cond or Conditioning()
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        # Unconditional first, as CompVis and diffusers batch it.
        both = Conditioning.cat([self._uncond_for(cond, x.shape[0]), cond])
        uncond_out, cond_out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        guided = uncond_out + self.scale * (cond_out - uncond_out)
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond_out, x, sigma, self.rescale)
        return guided
