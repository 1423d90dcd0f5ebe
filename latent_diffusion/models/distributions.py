"""The KL autoencoder's posterior: a Gaussian with diagonal covariance over the latent."""
from __future__ import annotations

import math

import torch

# The reference clamps log-variances to this range before exponentiating (CompVis
# ldm/modules/distributions/distributions.py), so that a badly trained encoder cannot overflow exp().
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments stacked as [mean, logvar] along channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                "DiagonalGaussianDistribution needs moments with an even channel count "
                f"(mean and log-variance stacked on dim 1); got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation (zero for a deterministic posterior)."""
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """Variance (zero for a deterministic posterior)."""
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps; eps comes from ``generator`` when given."""
        # Draw on the generator's own device so that a CPU generator gives the same latent for a
        # model on any device (the usual seeding convention of SD front ends).
        noise_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch element, summed over C, H, W; ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.square() + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).square() / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).square() / self.var,
            dim=dims,
        )
