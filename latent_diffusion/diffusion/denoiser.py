"""One wrapper that turns an eps-, v- or x0-predicting network into a denoiser.

A denoiser maps (noisy latent ``x = x0 + sigma * eps``, noise level ``sigma``, conditioning) to an
estimate of the clean latent ``x0``. Following Karras et al. 2022 (Table 1) every parameterisation is
``D(x, sigma) = c_skip * x + c_out * F(c_in * x, t(sigma))``; the samplers only ever see ``D``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import torch
from torch import Tensor

from .schedules import NoiseSchedule

Prediction = Literal["eps", "v", "x0"]
PREDICTIONS: tuple[str, ...] = ("eps", "v", "x0")


class Network(Protocol):
    """The CompVis UNet call: timestep t is a float tensor [B] in [0, T-1]."""

    def __call__(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor: ...


@dataclass(frozen=True)
class Conditioning:
    """What a network is conditioned on, by how it enters the network."""

    context: Tensor | None = None  # [B, L, D] sequence for cross-attention (text)
    y: Tensor | None = None  # [B] labels or [B, D] vector for the class / ADM embedding
    concat: Tensor | None = None  # [B, C, H, W] image channels concatenated to the latent

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Batch several conditionings into one (e.g. uncond and cond for one network call)."""
        names = {name for part in parts for name in part.tensors()}
        merged = {}
        for name in names:
            values = [getattr(part, name) for part in parts]
            if any(v is None for v in values):
                raise ValueError(f"cannot batch conditionings: {name!r} is set in some and missing in others")
            shapes = {tuple(v.shape[1:]) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot batch conditionings: {name!r} has different shapes {sorted(shapes)}")
            merged[name] = torch.cat(values)
        return Conditioning(**merged)


def prediction_scalings(prediction: Prediction, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) for a network trained on ``x_vp = x / sqrt(1 + sigma^2)`` (DDPM-style)."""
    c_in = 1 / (sigma**2 + 1) ** 0.5
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction == "v":
        # v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022), solved for x0.
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    if prediction == "x0":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


class Denoiser:
    """A discrete-time diffusion network (eps, v or x0 prediction) seen as ``D(x, sigma, cond) -> x0``.

    The network gets ``c_in * x`` (with ``cond.concat`` appended as channels) and the timestep of
    sigma, fractional between trained timesteps unless ``quantize_timesteps``.
    """

    def __init__(
        self,
        network: Network | Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: Prediction = "eps",
        *,
        quantize_timesteps: bool = False,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
        self.network = network
        self.schedule = schedule
        self.prediction = prediction
        self.quantize_timesteps = quantize_timesteps

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Conditioning | None = None) -> Tensor:
        # Noise-level arithmetic in float64 on the CPU (a [B] vector): exact timesteps for the 1e-5
        # agreement with the references, and no float64 needed on devices that lack it.
        sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64).expand(x.shape[0])
        c_skip, c_out, c_in = (
            c.to(x.device, x.dtype).view(-1, *[1] * (x.ndim - 1))
            for c in prediction_scalings(self.prediction, sigma)
        )
        t = self.schedule.timestep_at(sigma, quantize=self.quantize_timesteps)
        t = t.to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        cond = cond or Conditioning()
        model_input = c_in * x
        if cond.concat is not None:
            if cond.concat.shape[0] != x.shape[0] or cond.concat.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"concat conditioning of shape {tuple(cond.concat.shape)} does not match latent {tuple(x.shape)}"
                )
            model_input = torch.cat([model_input, cond.concat.to(x.dtype)], dim=1)
        output = self.network(model_input, t, context=cond.context, y=cond.y)
        return c_skip * x + c_out * output
