"""Fréchet distance between two feature sets, each summarised as a Gaussian (Heusel et al. 2017, FID).

d^2 = |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)

The trace of the matrix square root is taken from the eigenvalues of the symmetric PSD matrix
C_a^1/2 C_b C_a^1/2 (its eigenvalues equal those of C_a C_b), in float64, so no scipy is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set, in float64."""

    mean: torch.Tensor
    covariance: torch.Tensor
    count: int


def _as_float64_matrix(features: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    matrix = torch.as_tensor(features).detach().to(device="cpu", dtype=torch.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a (count, dim) matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {matrix.shape[0]}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return matrix


def feature_statistics(features: torch.Tensor | np.ndarray) -> FeatureStatistics:
    """Mean and unbiased covariance of a (count, dim) feature matrix."""
    matrix = _as_float64_matrix(features, "features")
    mean = matrix.mean(dim=0)
    centred = matrix - mean
    covariance = centred.T @ centred / (matrix.shape[0] - 1)
    return FeatureStatistics(mean, covariance, matrix.shape[0])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues from rounding become 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Squared Fréchet distance between the Gaussians N(a.mean, a.covariance) and N(b.mean, b.covariance)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}")
    sqrt_a = _psd_sqrt(a.covariance)
    middle = sqrt_a @ b.covariance @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (a.mean - b.mean).square().sum() + a.covariance.trace() + b.covariance.trace() - 2 * trace_sqrt
    # Rounding can leave a tiny negative number for identical sets.
    return max(float(distance), 0.0)


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Squared Fréchet distance between the Gaussian fits of two (count, dim) feature sets."""
    return frechet_distance_from_statistics(feature_statistics(features_a), feature_statistics(features_b))
