"""Quantiles of the Beta distribution, for the Beta sigma schedule (no SciPy dependency).

The CDF is the regularised incomplete beta function I_x(a, b), evaluated with its continued fraction
(Abramowitz & Stegun 26.5.8, modified Lentz's method) on the side of the mean where it converges
fast; the quantile inverts it by bisection, which always converges and reaches float64 resolution.
"""
from __future__ import annotations

import math

import numpy as np

_MAX_FRACTION_TERMS = 300
_CONVERGED = 1e-15  # relative change of a term; float64 rounding keeps it above ~2e-16
_BISECTION_STEPS = 64  # halves [0, 1] down to 2**-64, below float64 spacing near 1
_TINY = 1e-300


def _continued_fraction(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The continued fraction of I_x(a, b), elementwise (converges fast for x < (a + 1) / (a + b + 2))."""
    c = np.ones_like(x)
    d = 1 / _nonzero(1 - (a + b) * x / (a + 1))
    result = d.copy()
    for m in range(1, _MAX_FRACTION_TERMS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 / _nonzero(1 + numerator * d)
            c = _nonzero(1 + numerator / c)
            change = d * c
            result = result * change
        if np.abs(change - 1).max(initial=0.0) < _CONVERGED:
            break
    return result


def _nonzero(values: np.ndarray) -> np.ndarray:
    return np.where(np.abs(values) < _TINY, _TINY, values)


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b), the probability that a Beta(a, b) variable is <= x (float64, elementwise)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    inner = (x > 0) & (x < 1)
    x_safe = np.where(inner, x, 0.5)
    # I_x(a, b) = 1 - I_{1-x}(b, a): each point is evaluated on the side where its fraction converges.
    mirrored = x_safe >= (a + 1) / (a + b + 2)
    y = np.where(mirrored, 1 - x_safe, x_safe)
    p, q = np.where(mirrored, b, a), np.where(mirrored, a, b)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = np.exp(p * np.log(y) + q * np.log1p(-y) - log_beta)
    tail = front * _continued_fraction(y, p, q) / p
    value = np.where(mirrored, 1 - tail, tail)
    return np.where(inner, value, (x >= 1).astype(np.float64))


def beta_quantile(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """The x with I_x(a, b) = p for each probability p in [0, 1] (the inverse of :func:`beta_cdf`)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"the Beta distribution needs a > 0 and b > 0, got a={a}, b={b}")
    p = np.asarray(p, dtype=np.float64)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"probabilities must lie in [0, 1], got {p.tolist()}")
    low, high = np.zeros_like(p), np.ones_like(p)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        below = beta_cdf(middle, a, b) < p
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return np.where(p <= 0, 0.0, np.where(p >= 1, 1.0, (low + high) / 2))
