"""Samplers on data whose exact denoiser is known: convergence order and the right distribution."""
from __future__ import annotations

import math

import pytest
import torch

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion import samplers
from latent_diffusion.diffusion.analytic import GaussianMixture, gaussian_flow
from latent_diffusion.diffusion.registry import SAMPLERS, sigmas_for
from latent_diffusion.diffusion.sampling import sample
from latent_diffusion.diffusion.schedules import NoiseSchedule, karras_sigmas

F64 = dict(dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only waits

# Global order of accuracy each deterministic sampler promises: Euler/DDIM 1; Heun, DPM-Solver++(2M)
# 2; UniPC-2 3 (the corrector raises the predictor's order by one); LMS 4. PLMS uses constant-step
# Adams-Bashforth weights on eps, which on a grid that is not uniform in sigma leaves it second order.
PROMISED_ORDER = {
    "euler": (samplers.sample_euler, 1),
    "ddim": (samplers.sample_ddim, 1),
    "heun": (samplers.sample_heun, 2),
    "dpmpp_2m": (samplers.sample_dpmpp_2m, 2),
    "plms": (samplers.sample_plms, 2),
    "uni_pc": (samplers.sample_unipc, 3),
    "lms": (samplers.sample_lms, 4),
}


@pytest.mark.parametrize("name", sorted(PROMISED_ORDER))
def test_error_shrinks_with_promised_order(name):
    """Single Gaussian: the probability-flow ODE has a closed-form solution to compare with."""
    sampler, order = PROMISED_ORDER[name]
    mean, std, sigma_max, sigma_min = 0.5, 1.0, 20.0, 0.02
    data = GaussianMixture(torch.ones(1, **F64), torch.full((1, 1), mean, **F64), torch.full((1,), std, **F64))
    x_start = torch.linspace(-3, 3, 64, **F64)[:, None] * math.hypot(std, sigma_max)
    exact = gaussian_flow(x_start, mean, std, sigma_max, sigma_min)
    errors = []
    for steps in (16, 32, 64):
        sigmas = karras_sigmas(steps, sigma_min, sigma_max)[:-1]  # stop at sigma_min: no special last step
        errors.append((sampler(data.denoise, x_start, sigmas) - exact).abs().max().item())
    observed = math.log2(errors[-2] / errors[-1])
    assert errors[0] > errors[1] > errors[2]
    assert observed > order - 0.5, f"{name}: errors {errors}, observed order {observed:.2f}, promised {order}"


MIXTURE = GaussianMixture(
    weights=torch.tensor([0.3, 0.7], **F64),
    means=torch.tensor([[-1.0, 0.5], [1.0, -0.5]], **F64),
    stds=torch.tensor([0.3, 0.5], **F64),
)
SD_SCHEDULE = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012))


# Consistency samplers re-noise a distilled model's estimate of the clean image; with the exact posterior
# mean in its place they do not sample the data (LCM's spread comes out 0.14 short here, at its
# largest step count, 50). Tests/test_lcm.py checks them against diffusers' schedulers instead.
CONSISTENCY_SAMPLERS = {"lcm", "tcd"}


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - CONSISTENCY_SAMPLERS))
def test_samples_reach_data_mean_and_std(name):
    """Every registered sampler but the consistency ones, run as the CLI runs it (default spacing, SD's
    noise levels)."""
    spec = SAMPLERS[name]
    torch.manual_seed(0)
    sigmas = sigmas_for(spec, SD_SCHEDULE, 100)
    x = sample(spec, MIXTURE.denoise, sigmas, torch.randn_like, shape=(20000, 2), dtype=torch.float64)
    # 0.04 is about five standard errors of the 20000-sample mean / std estimates.
    torch.testing.assert_close(x.mean(0), MIXTURE.mean, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), MIXTURE.std, atol=0.04, rtol=0)


def test_exact_denoiser_is_posterior_mean():
    """Monte Carlo check of the closed form: E[x0 | x] over data near a fixed x equals denoise(x)."""
    generator = torch.Generator().manual_seed(3)
    x0 = MIXTURE.sample(400000, generator)
    sigma = 0.8
    x = x0 + sigma * torch.randn(x0.shape, generator=generator, **F64)
    # Averaged over the same points both sides are E[x0 | x in ball], so the ball may be wide.
    near = (x - torch.tensor([0.5, 0.0], **F64)).norm(dim=1) < 0.2
    estimate = x0[near].mean(0)
    exact = MIXTURE.denoise(x[near], torch.tensor(sigma)).mean(0)
    assert near.sum() > 1000
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)
