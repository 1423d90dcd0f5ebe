"""Samplers: plain functions that carry ``x`` from ``sigmas[0]`` down to ``sigmas[-1]`` with a denoiser.

Every sampler has the shape ``sample_x(denoiser, x, sigmas, *, cond, callback, ...) -> x`` where
``x = x0 + sigma * eps`` is in the variance-exploding frame of Karras et al. 2022 and
``denoiser(x, sigma, cond)`` returns the clean-latent estimate (see :mod:`.denoiser`). The
probability-flow ODE there reads ``dx/dsigma = (x - D(x, sigma)) / sigma``; with ``lambda = -log sigma``
the DPM-Solver family integrates its linear part exactly. Stochastic samplers take ``noise``, a
function returning standard normal noise shaped like its argument (see :class:`.sampling.BatchNoise`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .denoiser import Conditioning

DenoiserFn = Callable[[Tensor, Tensor, "Conditioning | None"], Tensor]
NoiseSource = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Step:
    """What a callback sees after each model evaluation of the main step."""

    index: int
    sigma: float
    sigma_next: float
    x: Tensor
    denoised: Tensor


Callback = Callable[[Step], None]


def _denoise(denoiser: DenoiserFn, x: Tensor, sigma: float, cond: Conditioning | None) -> Tensor:
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device), cond)


def _steps(sigmas: Tensor | Sequence[float]) -> list[tuple[int, float, float]]:
    levels = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if any(a <= b for a, b in zip(levels, levels[1:])) or levels[-1] < 0:
        raise ValueError(f"sigmas must decrease strictly to a level >= 0, got {levels}")
    return [(i, a, b) for i, (a, b) in enumerate(zip(levels, levels[1:]))]


def _report(callback: Callback | None, i: int, sigma: float, sigma_next: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(Step(i, sigma, sigma_next, x, denoised))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to ``sigma_next`` into a deterministic one to ``sigma_down`` plus fresh noise ``sigma_up``.

    DDIM's eq. 16 (Song et al. 2021) rewritten in sigma: eta = 0 is deterministic, eta = 1 is the
    DDPM posterior variance.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def sample_euler_ancestral(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, eta: float = 1.0, noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler step to ``sigma_down`` plus fresh noise of ``sigma_up`` (k-diffusion's "Euler a")."""
    noise = noise or torch.randn_like
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise(x) * sigma_up
    return x


def sample_ddim(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, eta: float = 0.0, noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): in sigma form exactly the ancestral Euler step with its eta."""
    return sample_euler_ancestral(denoiser, x, sigmas, cond=cond, eta=eta, noise=noise, callback=callback)


def lcm_boundary_scalings(timestep: float, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[float, float]:
    """(c_skip, c_out) of a consistency model's boundary condition at a (discrete) timestep (Song et al.
    2023; LCM's ``timestep_scaling`` of 10): the model's estimate passes through unchanged except
    near timestep 0, where it leans on the input."""
    scaled = timestep * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def sample_lcm(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, noise: NoiseSource | None = None, callback: Callback | None = None,
    schedule=None,
) -> Tensor:
    """Latent consistency sampling (Luo et al. 2023): each step takes the clean estimate (under the
    boundary condition, which needs the model's ``schedule`` to know the timestep; without it the
    estimate is taken as is, as k-diffusion's LCM does), then noises it afresh to the next level."""
    noise = noise or torch.randn_like
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        if schedule is not None:
            c_skip, c_out = lcm_boundary_scalings(float(schedule.timestep_at(sigma)))
            denoised = c_out * denoised + c_skip * (x / (1 + sigma**2) ** 0.5)  # the input in the network's frame
        _report(callback, i, sigma, sigma_next, x, denoised)
        x = denoised + noise(denoised) * sigma_next if sigma_next > 0 else denoised
    return x


def sample_tcd(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, gamma: float = 0.3, noise: NoiseSource | None = None,
    callback: Callback | None = None, schedule=None,
) -> Tensor:
    """Trajectory consistency sampling (Zheng et al. 2024): each step goes deterministically (DDIM) to the
    level of timestep ``floor((1 - gamma) * t_next)``, at or below the next one, then adds fresh noise back
    up to the next level; the last step adds none. ``gamma`` 0 is DDIM; 1 re-noises the clean estimate,
    as LCM does without its boundary condition. Needs the model's ``schedule`` for the timesteps."""
    if schedule is None:
        raise ValueError("the TCD sampler needs the model's noise schedule (its timesteps)")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD's gamma must lie in [0, 1], got {gamma}")
    noise = noise or torch.randn_like
    steps = _steps(sigmas)
    for i, sigma, sigma_next in steps:
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        sigma_between = _tcd_level(schedule, sigma_next, gamma)
        x = denoised + (x - denoised) / sigma * sigma_between
        if gamma > 0 and i < len(steps) - 1:
            x = x + noise(x) * (sigma_next**2 - sigma_between**2) ** 0.5
    return x


def _tcd_level(schedule, sigma_next: float, gamma: float) -> float:
    """The level TCD steps to before re-noising: that of the trained timestep ``floor((1 - gamma) * t_next)``."""
    if gamma == 0 or sigma_next == 0:
        return sigma_next
    timestep = float(schedule.timestep_at(sigma_next))
    if abs(timestep - round(timestep)) < 1e-6:  # a trained level, whose timestep came back as 498.99999...
        timestep = round(timestep)
    return float(schedule.sigmas[math.floor((1 - gamma) * timestep)])


def sample_ddpm(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, noise: NoiseSource | None = None, callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): the posterior q(x_prev | x, x0) is DDIM with eta = 1."""
    return sample_euler_ancestral(denoiser, x, sigmas, cond=cond, eta=1.0, noise=noise, callback=callback)


def sample_heun(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, callback: Callback | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1); the last step to sigma = 0 is Euler."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        slope_next = (x_euler - _denoise(denoiser, x_euler, sigma_next, cond)) / sigma_next
        x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
    return x


def _lagrange_weights(nodes: list[float], start: float, end: float) -> list[float]:
    """Integrals over [start, end] of the Lagrange basis polynomials on ``nodes`` (Gauss-Legendre, exact)."""
    points, weights = np.polynomial.legendre.leggauss(max(len(nodes), 1))
    taus = (end - start) / 2 * points + (end + start) / 2
    result = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(taus)
        for k, node_k in enumerate(nodes):
            if k != j:
                basis *= (taus - node_k) / (node_j - node_k)
        result.append(float((end - start) / 2 * np.sum(weights * basis)))
    return result


def sample_lms(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, order: int = 4, callback: Callback | None = None,
) -> Tensor:
    """Linear multistep (Adams-Bashforth with variable steps in sigma), as k-diffusion's and diffusers' LMS."""
    if order < 1:
        raise ValueError(f"LMS order must be >= 1, got {order}")
    history: list[tuple[float, Tensor]] = []  # (sigma, dx/dsigma) of the latest evaluations
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        history = (history + [(sigma, (x - denoised) / sigma)])[-order:]
        weights = _lagrange_weights([s for s, _ in history], sigma, sigma_next)
        x = x + sum(w * slope for w, (_, slope) in zip(weights, history))
    return x


# Adams-Bashforth weights for constant steps, newest first (PNDM eqs. 11-12).
_ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_plms(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, callback: Callback | None = None,
) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022): Adams-Bashforth on eps with DDIM as the transfer.

    The first step is the pseudo improved Euler (trapezoid) step with one extra evaluation, as in
    CompVis' PLMS and diffusers' PNDM with ``skip_prk_steps=True``; PNDM proper (three Runge-Kutta
    warm-up steps) is not implemented.
    """
    previous: list[Tensor] = []  # eps of earlier steps, newest last
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        eps = (x - denoised) / sigma
        if not previous and sigma_next > 0:
            x_trial = x + eps * (sigma_next - sigma)
            eps_trial = (x_trial - _denoise(denoiser, x_trial, sigma_next, cond)) / sigma_next
            eps_combined = (eps + eps_trial) / 2
        else:
            history = [eps] + previous[::-1][:3]
            eps_combined = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(history) - 1], history))
        previous = (previous + [eps])[-3:]
        x = x + eps_combined * (sigma_next - sigma)
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep in lambda = -log sigma."""
    previous, h_previous = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised  # the first-order update's limit; both references end with it
        else:
            h = math.log(sigma / sigma_next)
            estimate = denoised
            if previous is not None:
                r = h_previous / h
                estimate = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
            h_previous = h
        previous = denoised
    return x


def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, eta: float = 1.0, noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, appendix; midpoint variant as diffusers and k-diffusion)."""
    noise = noise or torch.randn_like
    previous, h_previous = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            gain = -math.expm1(-h - eta_h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + gain * denoised
            if previous is not None:
                x = x + 0.5 * gain * (h / h_previous) * (denoised - previous)
            if eta > 0:
                x = x + noise(x) * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5
            h_previous = h
        previous = denoised
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, eta: float = 1.0, noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, midpoint in lambda) to sigma_down, then ancestral noise."""
    noise = noise or torch.randn_like
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_down)
            sigma_mid = sigma * math.exp(-h / 2)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * _denoise(denoiser, x_mid, sigma_mid, cond)
        if sigma_up > 0:
            x = x + noise(x) * sigma_up
    return x


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, Tensor]],
    order: int,
    variant: str,
    denoised_next: Tensor | None = None,
) -> Tensor:
    """One UniPC step (Zhao et al. 2023, Alg. 2-3, data prediction) from ``sigma`` to ``sigma_next``.

    ``history`` holds (sigma, denoised) pairs ending at ``sigma``. Without ``denoised_next`` this is
    the predictor UniP of the given order; with it, the corrector UniC that reuses the evaluation at
    ``sigma_next`` (so it costs no extra model call).
    """
    h = math.log(sigma / sigma_next)
    current = history[-1][1]
    earlier = history[-order:-1][::-1] if order > 1 else []  # newest first
    ratios = [math.log(sigma / s) / h for s, _ in earlier]
    differences = [(d - current) / r for r, (_, d) in zip(ratios, earlier)]
    hh = -h
    h_phi_1 = math.expm1(hh)
    scale = hh if variant == "bh1" else math.expm1(hh)
    # b_k = k! * phi_{k+1}(hh) * hh / B(h): the right-hand side of the order conditions (eq. 8).
    rhs, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rhs.append(h_phi_k * factorial / scale)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    powers = [[r ** (k - 1) for r in ratios + [1.0]] for k in range(1, order + 1)]
    x_next = (sigma_next / sigma) * x - h_phi_1 * current
    if denoised_next is None:
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in powers[:-1]], rhs[:-1])
        return x_next - scale * sum(rho * d for rho, d in zip(rhos, differences))
    rhos = [0.5] if order == 1 else _solve(powers, rhs)
    correction = sum((rho * d for rho, d in zip(rhos[:-1], differences)), torch.zeros_like(x))
    return x_next - scale * (correction + rhos[-1] * (denoised_next - current))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    a = torch.tensor(matrix, dtype=torch.float64)
    return torch.linalg.solve(a, torch.tensor(rhs, dtype=torch.float64)).tolist()


def sample_unipc(
    denoiser: DenoiserFn, x: Tensor, sigmas: Tensor, *,
    cond: Conditioning | None = None, order: int = 2, variant: str = "bh2",
    callback: Callback | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor plus a corrector that reuses the next evaluation.

    Defaults as diffusers' UniPCMultistepScheduler: order 2, B(h) = e^h - 1 ("bh2"), lower order in
    the warm-up and at the final steps.
    """
    if order < 1 or variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC needs order >= 1 and variant 'bh1' or 'bh2', got {order}, {variant!r}")
    steps = _steps(sigmas)
    history: list[tuple[float, Tensor]] = []
    x_before, order_before = None, 0
    for i, sigma, sigma_next in steps:
        denoised = _denoise(denoiser, x, sigma, cond)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if x_before is not None:
            x = _unipc_update(x_before, history[-1][0], sigma, history, order_before, variant, denoised)
        history = (history + [(sigma, denoised)])[-order:]
        step_order = min(order, len(steps) - i, i + 1)
        x_before, order_before = x, step_order
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_update(x, sigma, sigma_next, history, step_order, variant)
    return x
