"""Data whose exact denoiser is known in closed form: isotropic Gaussian mixtures.

For ``x = x0 + sigma * n`` with x0 drawn from component k = N(mu_k, s_k^2 I), ``x`` given k is
N(mu_k, (s_k^2 + sigma^2) I) and ``E[x0 | x, k] = mu_k + s_k^2 / (s_k^2 + sigma^2) * (x - mu_k)``; the
exact denoiser averages these with the posterior component weights. Used to test samplers against
the truth and to measure their error against the number of model evaluations (bench/samplers.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Isotropic Gaussian mixture over vectors of ``dim`` features (the samplers' x is [N, dim])."""

    weights: Tensor  # [K], sums to 1
    means: Tensor  # [K, dim]
    stds: Tensor  # [K]

    def __post_init__(self) -> None:
        k = self.weights.shape[0]
        if self.means.shape[0] != k or self.stds.shape != (k,):
            raise ValueError("weights [K], means [K, dim] and stds [K] must agree on K")
        if (self.stds <= 0).any() or (self.weights < 0).any():
            raise ValueError("stds must be positive and weights non-negative")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def std(self) -> Tensor:
        """Per-feature standard deviation."""
        second_moment = (self.weights[:, None] * (self.means**2 + self.stds[:, None] ** 2)).sum(0)
        return (second_moment - self.mean**2).sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[component] + self.stds[component, None] * noise

    def denoise(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        """The exact ``E[x0 | x]`` at noise level sigma ([N] or scalar); ``cond`` is ignored."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])[:, None]
        xd = x.to(torch.float64)
        variance = self.stds.to(torch.float64) ** 2 + sigma**2  # [N, K]
        distance = ((xd[:, None, :] - self.means.to(torch.float64)) ** 2).sum(-1)  # [N, K]
        log_p = torch.log(self.weights.to(torch.float64)) - distance / (2 * variance)
        log_p = log_p - self.dim / 2 * torch.log(2 * math.pi * variance)
        responsibility = torch.softmax(log_p, dim=1)
        shrink = self.stds.to(torch.float64) ** 2 / variance  # [N, K]
        per_component = self.means + shrink[..., None] * (xd[:, None, :] - self.means)
        return (responsibility[..., None] * per_component).sum(1).to(x.dtype)


def gaussian_flow(x: Tensor, mean: float, std: float, sigma_from: float, sigma_to: float) -> Tensor:
    """Exact probability-flow ODE map for N(mean, std^2) data: ``x - mean`` scales with sqrt(std^2 + sigma^2)."""
    return mean + (x - mean) * math.sqrt((std**2 + sigma_to**2) / (std**2 + sigma_from**2))
