"""Training noise schedules and the selection of sampling steps.

Two views of one schedule: the discrete ``alpha_bar[t]`` of DDPM (Ho et al. 2020), and the noise level
``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` of Karras et al. 2022, in which a noisy latent is
``x = x0 + sigma * eps`` (variance exploding). The samplers work in the sigma view; the network is
trained on ``x_vp = x / sqrt(1 + sigma**2)`` and a timestep, which :class:`NoiseSchedule` converts to
and from (``timestep_at`` / ``sigma_at``, interpolating log-sigma for levels between two timesteps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

from ..config import ScheduleConfig

Spacing = Literal["leading", "trailing", "linspace", "uniform", "karras", "lcm"]
# The timesteps a latent consistency model was distilled on: every (T / 50)-th, ending at T - 1.
LCM_ORIGINAL_STEPS = 50
FinalSigma = Literal["zero", "sigma_min"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace", "uniform", "karras")


def _cosine_betas(timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: betas that discretise alpha_bar(t) = cos^2((t + s) / (1 + s) * pi/2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta) for i in range(timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod_for(config: ScheduleConfig) -> Tensor:
    """alpha_bar[t] for t = 0..T-1 (float64 tensor) of a training schedule.

    "scaled_linear" is CompVis' "linear" (betas linear in sqrt space, Stable Diffusion's schedule),
    "linear" has betas linear themselves, "cosine" is Nichol & Dhariwal's. The betas and their
    cumulative product are computed in float32, as diffusers does: CompVis computes them in float64
    and stores float32, and near t = 0 the two differ by up to ~1e-5 in sigma, which is more than the
    1e-5 agreement we test against diffusers' schedulers.
    """
    n = config.timesteps
    if n < 2:
        raise ValueError(f"a schedule needs at least 2 timesteps, got {n}")
    if config.kind == "linear":
        betas = torch.linspace(config.linear_start, config.linear_end, n, dtype=torch.float32)
    elif config.kind == "scaled_linear":
        betas = torch.linspace(config.linear_start**0.5, config.linear_end**0.5, n, dtype=torch.float32) ** 2
    elif config.kind == "cosine":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"unknown schedule kind {config.kind!r}; expected 'linear', 'scaled_linear' or 'cosine'")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """alpha_bar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def scale_to_vp(x: Tensor, sigma: float | Tensor) -> Tensor:
    """``x0 + sigma * eps`` as the network and DDPM see it: ``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``."""
    return x / (1 + sigma**2) ** 0.5


def scale_from_vp(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Inverse of :func:`scale_to_vp`."""
    return x * (1 + sigma**2) ** 0.5


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete training schedule seen as noise levels: ``sigmas[t]`` for t = 0..T-1, increasing."""

    alphas_cumprod: Tensor  # float64 [T]

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        return cls(alphas_cumprod_for(config))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @cached_property
    def sigmas(self) -> Tensor:
        return alpha_bar_to_sigma(self.alphas_cumprod)

    @cached_property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_at(self, timestep: Tensor | float) -> Tensor:
        """Noise level at a (possibly fractional) timestep, interpolating log-sigma (as k-diffusion)."""
        t = torch.as_tensor(timestep, dtype=torch.float64)
        if (t < 0).any() or (t > self.num_timesteps - 1).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.tolist()}")
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def timestep_at(self, sigma: Tensor | float, *, quantize: bool = False) -> Tensor:
        """Inverse of :meth:`sigma_at`; beyond the trained range it clamps to 0 or T-1.

        ``quantize`` returns the nearest trained timestep instead, as diffusers' DPM-Solver and UniPC
        do with Karras sigmas (and A1111's "quantization in K samplers" option).
        """
        sigma = torch.as_tensor(sigma)
        log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        if quantize:
            return (log_sigma.unsqueeze(-1) - log_sigmas).abs().argmin(dim=-1).to(torch.float64)
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_timesteps - 2)
        w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
        return low + w


def spaced_timesteps(
    num_steps: int, spacing: Spacing = "leading", *, num_train_timesteps: int = 1000, steps_offset: int = 0
) -> Tensor:
    """The timesteps a sampler visits, descending (float64).

    As named in diffusers: "leading" ``k * (T // n) + steps_offset`` (Stable Diffusion's scheduler
    config sets ``steps_offset = 1``), "trailing" ``round(T - k * T / n) - 1`` (starts at T-1),
    "linspace" ``linspace(T-1, 0, n)``, left fractional as in diffusers' Euler/Heun/LMS (its DDIM and
    PNDM round them). "uniform" is CompVis' DDIM/PLMS discretisation ``range(0, T, T // n) + 1``,
    which gives more than n steps when n does not divide T, as the reference does (it crashes where
    T // n divides T - 1; we drop that step past the schedule). "lcm" takes n of the 50 timesteps a
    latent consistency model was distilled on (``k * T // 50 - 1``), at evenly spaced places from the
    top (Luo et al. 2023; diffusers' ``LCMScheduler``).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    T, n = num_train_timesteps, num_steps
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":
        t = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, n, dtype=torch.float64)
    elif spacing == "lcm":
        t = _lcm_timesteps(n, T)
    elif spacing == "uniform":
        t = torch.arange(0, T, T // n, dtype=torch.float64) + 1
        # Where T // n divides T - 1 (n = 9, 27, 37, ...) the last one is T, an IndexError in CompVis.
        t = t[t <= T - 1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of leading, trailing, linspace, uniform, lcm")
    if t.max() > T - 1:
        raise ValueError(
            f"{spacing!r} spacing of {n} steps (steps_offset={steps_offset}) reaches timestep {int(t.max())}, "
            f"past the last trained timestep {T - 1}"
        )
    return t.sort(descending=True).values


def _lcm_timesteps(num_steps: int, num_train_timesteps: int) -> Tensor:
    if num_steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"the LCM schedule has {LCM_ORIGINAL_STEPS} timesteps to choose from; {num_steps} steps asked "
                         "(LCM is made for 2-8)")
    distilled = torch.arange(LCM_ORIGINAL_STEPS, 0, -1, dtype=torch.float64) * (num_train_timesteps // LCM_ORIGINAL_STEPS) - 1
    places = torch.floor(torch.arange(num_steps, dtype=torch.float64) * LCM_ORIGINAL_STEPS / num_steps).long()
    return distilled[places]


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: n levels evenly spaced in sigma^(1/rho), then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def make_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: Spacing = "linspace",
    *,
    steps_offset: int = 0,
    final: FinalSigma = "zero",
) -> Tensor:
    """The sigma sequence a sampler integrates over: one level per step plus the final level.

    ``final="sigma_min"`` ends at the smallest trained noise level instead of 0, as CompVis' DDIM/PLMS
    and diffusers' DDIM/PNDM with ``set_alpha_to_one=False`` do; the result is then returned at that
    level (see :func:`scale_to_vp`). Karras sigmas span the whole trained range.
    """
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    if spacing == "karras":
        sigmas = karras_sigmas(num_steps, schedule.sigma_min, schedule.sigma_max)[:-1]
    else:
        timesteps = spaced_timesteps(
            num_steps, spacing, num_train_timesteps=schedule.num_timesteps, steps_offset=steps_offset
        )
        sigmas = schedule.sigma_at(timesteps)
    last = 0.0 if final == "zero" else schedule.sigma_min
    return torch.cat([sigmas, torch.tensor([last], dtype=torch.float64)])


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a sigma sequence that img2img runs: the last ``int(n * strength)`` steps (as diffusers)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    num_steps = len(sigmas) - 1
    start = num_steps - min(int(num_steps * strength), num_steps)
    return sigmas[start:]
