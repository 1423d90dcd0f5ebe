"""Recover the training noise schedule from the buffers CompVis checkpoints store next to the weights.

CompVis' ``DDPM.register_schedule`` saves ``betas``, ``alphas_cumprod`` and a dozen quantities
derived from them. They are not weights, but they record the schedule the model was trained with,
which matters more than what a config claims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latent_diffusion.config import ScheduleConfig

# What ``register_schedule`` stores (all derived from ``betas``), plus the loss weighting ``logvar``.
SCHEDULE_BUFFER_NAMES = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})


@dataclass(frozen=True)
class TrainingSchedule:
    """The noise schedule a checkpoint stores: its values, and the named schedule they follow if any."""

    betas: torch.Tensor  # float64, [T]
    alphas_cumprod: torch.Tensor  # float64, [T]
    config: ScheduleConfig | None  # None: not a linear / scaled-linear schedule we can name


def _betas(kind: str, timesteps: int, start: float, end: float) -> torch.Tensor:
    if kind == "scaled_linear":  # CompVis "linear": linear in sqrt(beta)
        return torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def _round(value: float) -> float:
    """The decimal a config would have written, e.g. 0.0008500000112 (float32 of 0.00085) -> 0.00085."""
    return float(f"{value:.6g}")


def name_schedule(betas: torch.Tensor) -> ScheduleConfig | None:
    """The linear or scaled-linear :class:`ScheduleConfig` that produced ``betas``, if one did."""
    betas = betas.detach().to("cpu", torch.float64).flatten()
    if betas.numel() < 2:
        return None
    start, end = _round(betas[0].item()), _round(betas[-1].item())
    for kind in ("scaled_linear", "linear"):
        expected = _betas(kind, betas.numel(), start, end)
        # Stored buffers are float32 copies of float64 values.
        if torch.allclose(betas, expected, rtol=1e-5, atol=0.0):
            return ScheduleConfig(kind=kind, timesteps=betas.numel(), linear_start=start, linear_end=end)
    return None


def read_training_schedule(buffers: dict[str, torch.Tensor]) -> TrainingSchedule | None:
    """The schedule in ``betas`` / ``alphas_cumprod`` buffers (no prefix), or None when neither is stored."""
    betas = buffers.get("betas")
    alphas_cumprod = buffers.get("alphas_cumprod")
    if betas is None and alphas_cumprod is None:
        return None
    if betas is not None:
        betas = betas.detach().to("cpu", torch.float64).flatten()
        if alphas_cumprod is None:
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64).flatten()
    if betas is None:
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / previous
    if not (math.isfinite(betas.sum().item()) and betas.min() > 0 and betas.max() < 1):
        raise ValueError("the stored diffusion schedule (betas / alphas_cumprod) is not a valid schedule")
    return TrainingSchedule(betas=betas, alphas_cumprod=alphas_cumprod, config=name_schedule(betas))
