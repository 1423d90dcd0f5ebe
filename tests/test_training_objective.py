"""The stage-2 objective is defined by the denoiser's scalings and equals the textbook eps / v / x0 losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.schedules import NoiseSchedule, alpha_bar_to_sigma, alphas_cumprod_for
from latent_diffusion.training.objective import network_input_and_target


def textbook(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor):
    """DDPM noising and the eps / v (Salimans & Ho 2022) / x0 targets, written out in float32."""
    a = alpha_bar.view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
    return x_t, target


def batch(kind: str):
    """Every timestep of a schedule once, with random latents and noise."""
    alphas_cumprod = alphas_cumprod_for(ScheduleConfig(kind=kind)).float()
    t = torch.arange(alphas_cumprod.shape[0])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(t.shape[0], 4, 4, 4, generator=g) * 1.5
    eps = torch.randn(t.shape[0], 4, 4, 4, generator=g)
    return t, x0, eps, alphas_cumprod[t]


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_input_target_and_loss_equal_the_textbook_ones(prediction, kind):
    t, x0, eps, alpha_bar = batch(kind)
    model_input, target = network_input_and_target(prediction, x0, eps, alpha_bar)
    old_input, old_target = textbook(prediction, x0, eps, alpha_bar)
    if prediction in ("eps", "x0"):
        assert torch.equal(target, old_target)
    # The rest differs by float32 rounding only (at most one unit in the last place here).
    torch.testing.assert_close(target, old_target, rtol=0, atol=5e-7)
    torch.testing.assert_close(model_input, old_input, rtol=0, atol=5e-7)

    torch.manual_seed(0)
    network = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        loss = F.mse_loss(network(model_input), target, reduction="none").mean(dim=(1, 2, 3))
        old_loss = F.mse_loss(network(old_input), old_target, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, old_loss, rtol=2e-6, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_denoiser_turns_the_training_target_back_into_the_clean_latent(prediction):
    # A network that outputs exactly its training target, wrapped by the sampler's denoiser, gives x0:
    # training and sampling read the parameterisation the same way.
    t, x0, eps, alpha_bar = batch("scaled_linear")
    model_input, target = network_input_and_target(prediction, x0, eps, alpha_bar)
    sigma = alpha_bar_to_sigma(alpha_bar.double())
    seen = {}

    def network(x, timestep, context=None, y=None):
        seen["input"], seen["t"] = x, timestep
        return target

    schedule = NoiseSchedule(alphas_cumprod_for(ScheduleConfig(kind="scaled_linear")))
    x = x0 + sigma.float().view(-1, 1, 1, 1) * eps
    denoised = Denoiser(network, schedule, prediction)(x, sigma)
    torch.testing.assert_close(denoised, x0, rtol=0, atol=2e-5)
    torch.testing.assert_close(seen["input"], model_input, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["t"], t.float(), rtol=0, atol=1e-2)
