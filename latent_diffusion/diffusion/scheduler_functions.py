"""The sigma schedules of the named schedulers (:mod:`.schedulers`), as plain functions.

Each is ``(schedule, num_steps) -> sigmas``: ``num_steps + 1`` strictly decreasing float64 levels,
from the model's training :class:`NoiseSchedule`, that end at 0 (KL Optimal ends at the smallest
trained level, as A1111's does).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .beta_distribution import beta_quantile
from .schedulers import ModelKind
from .schedules import NoiseSchedule, karras_sigmas, make_sigmas

# Align Your Steps (Sabour et al. 2024): the optimised 10-step noise levels of Stable Diffusion 1.5
# and SDXL, as published with the paper (11 levels, the last being the smallest trained one).
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
# The Beta schedule's distribution (Lee et al. 2024), A1111's default options.
BETA_ALPHA = 0.6
BETA_BETA = 0.6


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a whole number >= 1, got {num_steps!r}")


def _then_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def uniform(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """Timesteps evenly spaced from the last trained one to 0 (k-diffusion's default ``get_sigmas``).

    One step starts at the top, as k-diffusion's spacing from T-1 down does; the "linspace" spacing
    (diffusers', the k-samplers' own schedule) spaces from 0 up and would start one step at the bottom.
    """
    if num_steps == 1:
        return _then_zero(torch.tensor([schedule.sigma_max]))
    return make_sigmas(schedule, num_steps, "linspace")


def karras(schedule: NoiseSchedule, num_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5, over the whole trained range."""
    return karras_sigmas(num_steps, schedule.sigma_min, schedule.sigma_max, rho)


def polyexponential(schedule: NoiseSchedule, num_steps: int, rho: float = 1.0) -> Tensor:
    """log-sigma along a polynomial ramp ``(1 - k/(n-1))^rho`` from sigma_max down to sigma_min."""
    _check_steps(num_steps)
    ramp = torch.linspace(1, 0, num_steps, dtype=torch.float64) ** rho
    low, high = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    return _then_zero((ramp * (high - low) + low).exp())


def exponential(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """Evenly spaced in log-sigma from sigma_max to sigma_min (polyexponential with rho = 1)."""
    _check_steps(num_steps)
    log_sigmas = torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), num_steps,
                                dtype=torch.float64)
    return _then_zero(log_sigmas.exp())


def _timesteps_between_ends(schedule: NoiseSchedule, count: int) -> Tensor:
    """``count`` timesteps evenly spaced from that of sigma_max to that of sigma_min, both included."""
    start = schedule.timestep_at(schedule.sigma_max).item()
    end = schedule.timestep_at(schedule.sigma_min).item()
    return torch.linspace(start, end, count, dtype=torch.float64)


def normal(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """Timesteps evenly spaced from sigma_max's to sigma_min's (ComfyUI's and A1111's "normal")."""
    _check_steps(num_steps)
    return _then_zero(schedule.sigma_at(_timesteps_between_ends(schedule, num_steps)))


def sgm_uniform(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """The first ``n`` of ``n + 1`` timesteps evenly spaced from sigma_max's to sigma_min's (SGM/SDXL-Turbo)."""
    _check_steps(num_steps)
    return _then_zero(schedule.sigma_at(_timesteps_between_ends(schedule, num_steps + 1)[:-1]))


def trailing(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """Every (T/n)-th trained timestep counted down from the last, T-1 (diffusers' "trailing" spacing).

    Adversarially distilled models (SD-Turbo, SDXL-Turbo) were trained at these levels: one step
    starts at T-1, four at T-1, 3T/4-1, T/2-1 and T/4-1.
    """
    _check_steps(num_steps)
    return make_sigmas(schedule, num_steps, "trailing")


def simple(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """Every (T/n)-th trained level counted down from the top, truncating the fractional index."""
    _check_steps(num_steps)
    stride = schedule.num_timesteps / num_steps
    indices = [schedule.num_timesteps - 1 - int(k * stride) for k in range(num_steps)]
    return _then_zero(schedule.sigmas[indices])


def ddim_uniform(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """The trained levels at timesteps 1, 1 + T//n, 1 + 2 T//n, ... (CompVis DDIM's "uniform"), descending."""
    _check_steps(num_steps)
    stride = max(schedule.num_timesteps // num_steps, 1)
    indices = list(range(1, schedule.num_timesteps, stride))[::-1]
    return _then_zero(schedule.sigmas[indices])


def kl_optimal(schedule: NoiseSchedule, num_steps: int) -> Tensor:
    """``tan`` of a linear ramp from atan(sigma_max) to atan(sigma_min): n + 1 levels ending at sigma_min."""
    _check_steps(num_steps)
    ramp = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return torch.tan(ramp * math.atan(schedule.sigma_min) + (1 - ramp) * math.atan(schedule.sigma_max))


def beta(schedule: NoiseSchedule, num_steps: int, alpha: float = BETA_ALPHA, beta_: float = BETA_BETA) -> Tensor:
    """Lee et al. 2024: sigma_min + (sigma_max - sigma_min) * Beta(alpha, beta) quantiles of 1 - k/(n-1)."""
    _check_steps(num_steps)
    quantiles = beta_quantile(1 - np.linspace(0, 1, num_steps), alpha, beta_)
    sigma_min, sigma_max = schedule.sigma_min, schedule.sigma_max
    return _then_zero(torch.from_numpy(sigma_min + quantiles * (sigma_max - sigma_min)))


def loglinear_interpolation(levels: tuple[float, ...] | Tensor, count: int) -> Tensor:
    """``count`` levels spread over a decreasing sequence, interpolating log-sigma linearly in position."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    if count == len(levels):
        return levels.clone()
    positions = torch.linspace(0, len(levels) - 1, count, dtype=torch.float64)
    low = positions.floor().long().clamp(max=len(levels) - 2)
    weight = positions - low
    log_levels = levels.log()
    return ((1 - weight) * log_levels[low] + weight * log_levels[low + 1]).exp()


def align_your_steps(schedule: NoiseSchedule, num_steps: int, model_kind: ModelKind = "sd1") -> Tensor:
    """The published 10-step table of SD 1.5 (every model but SDXL) or SDXL, log-linearly resampled.

    ``n`` steps take ``n + 1`` levels of the table with the last (the smallest trained level) set to
    0, as the paper's own use with diffusers does (its 10 timesteps end at t = 24, then sigma 0).
    A1111 instead resamples the table to ``n`` levels then appends 0, so its 10 steps are not the
    published ones; here 10 steps are.
    """
    _check_steps(num_steps)
    table = AYS_SDXL if model_kind == "sdxl" else AYS_SD1
    levels = loglinear_interpolation(table, num_steps + 1)
    levels[-1] = 0.0
    return levels
