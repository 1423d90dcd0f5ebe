"""Fréchet distance: closed forms and an independent numpy computation."""
import numpy as np
import pytest
import torch

from latent_diffusion.evaluation.frechet import feature_statistics, frechet_distance


def test_identical_sets_are_at_distance_zero():
    features = torch.randn(200, 16, dtype=torch.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_one_dimensional_sets_match_the_gaussian_closed_form():
    # For 1-D Gaussians d^2 = (m1 - m2)^2 + (s1 - s2)^2; evaluated with the samples' own moments.
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 1.5, size=(500, 1))
    b = rng.normal(-1.2, 0.4, size=(700, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_distance_grows_with_a_mean_shift():
    base = torch.randn(400, 8, dtype=torch.float64)
    distances = [frechet_distance(base, base + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] < 1e-8
    # A pure shift by s in every one of 8 dimensions adds exactly 8 s^2.
    assert distances[2] == pytest.approx(8.0, rel=1e-9)


def test_matches_an_independent_eigenvalue_computation():
    # tr sqrt(C_a C_b) equals the sum of square roots of the eigenvalues of C_a C_b (real, >= 0 for PSD pairs).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.7
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    expected = (
        np.sum((a.mean(0) - b.mean(0)) ** 2)
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2 * np.sum(np.sqrt(np.clip(eigenvalues.real, 0, None)))
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    stats = feature_statistics(a)
    np.testing.assert_allclose(stats.covariance.numpy(), cov_a, rtol=1e-12)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 4), float("nan")), torch.randn(5, 4))
