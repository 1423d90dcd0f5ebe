"""Noise schedules and step selection against diffusers' schedulers."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion.schedules import (
    NoiseSchedule,
    alpha_bar_to_sigma,
    alphas_cumprod_for,
    img2img_sigmas,
    karras_sigmas,
    make_sigmas,
    scale_from_vp,
    scale_to_vp,
    sigma_to_alpha_bar,
    spaced_timesteps,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD = ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012)
DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize(
    "config",
    [SD, ScheduleConfig("linear", 1000, 0.0001, 0.02), ScheduleConfig("cosine", 1000), ScheduleConfig("scaled_linear", 500, 0.0015, 0.0195)],
    ids=["sd", "linear", "cosine", "ldm-500"],
)
def test_alphas_cumprod_match_diffusers(config):
    ref = DDIMScheduler(
        num_train_timesteps=config.timesteps, beta_start=config.linear_start, beta_end=config.linear_end,
        beta_schedule=DIFFUSERS_KIND[config.kind],
    ).alphas_cumprod
    torch.testing.assert_close(alphas_cumprod_for(config), ref.double(), rtol=0, atol=0)


def test_both_views_convert_into_each_other():
    schedule = NoiseSchedule.from_config(SD)
    alpha_bar = schedule.alphas_cumprod
    torch.testing.assert_close(sigma_to_alpha_bar(alpha_bar_to_sigma(alpha_bar)), alpha_bar)
    torch.testing.assert_close(schedule.sigma_at(torch.arange(1000.0)), schedule.sigmas)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(scale_from_vp(scale_to_vp(x, 2.5), 2.5), x)


def test_continuous_sigma_between_timesteps():
    schedule = NoiseSchedule.from_config(SD)
    t = torch.tensor([0.0, 0.25, 10.5, 500.75, 998.5, 999.0], dtype=torch.float64)
    sigma = schedule.sigma_at(t)
    low, high = schedule.sigmas[t.floor().long()], schedule.sigmas[t.ceil().long()]
    assert ((sigma >= low * (1 - 1e-12)) & (sigma <= high * (1 + 1e-12))).all()
    torch.testing.assert_close(schedule.timestep_at(sigma), t, rtol=0, atol=1e-9)
    # diffusers' _sigma_to_t (log-sigma interpolation) is the reference for the inverse.
    reference = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    log_sigmas = np.log(schedule.sigmas.numpy())
    probe = np.exp(np.random.default_rng(0).uniform(np.log(0.03), np.log(14.0), 50))
    ref_t = np.array([reference._sigma_to_t(s, log_sigmas) for s in probe])
    torch.testing.assert_close(schedule.timestep_at(torch.from_numpy(probe)), torch.from_numpy(ref_t))
    assert schedule.timestep_at(torch.tensor(100.0)) == 999 and schedule.timestep_at(torch.tensor(1e-4)) == 0
    quantized = schedule.timestep_at(torch.from_numpy(probe), quantize=True)
    torch.testing.assert_close(quantized, torch.from_numpy(ref_t).round())


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50, 999])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_spacings_match_diffusers(spacing, offset, steps):
    ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(steps)
    euler = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(steps)
    ours = spaced_timesteps(steps, spacing, steps_offset=offset)
    # diffusers' DDIM rounds linspace timesteps; its Euler family keeps them fractional, as we do.
    torch.testing.assert_close(ours.float(), euler.timesteps, rtol=0, atol=1e-4)
    expected = ours.round() if spacing == "linspace" else ours
    torch.testing.assert_close(expected.long(), ddim.timesteps)


@pytest.mark.parametrize("steps", [9, 10, 30, 50, 1000])
def test_uniform_spacing_is_compvis_ddim(steps):
    # CompVis make_ddim_timesteps("uniform"): range(0, T, T // n) + 1, however many that gives; where
    # that reaches T (n = 9, 1000) the reference would index past its schedule and we drop the step.
    expected = [t for t in sorted((np.arange(0, 1000, 1000 // steps) + 1).tolist(), reverse=True) if t < 1000]
    assert spaced_timesteps(steps, "uniform").long().tolist() == expected
    assert len(expected) >= steps - 1
    if 1000 % steps == 0 and steps < 1000:
        torch.testing.assert_close(spaced_timesteps(steps, "uniform"), spaced_timesteps(steps, "leading", steps_offset=1))


def test_karras_sigmas_match_diffusers():
    reference = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    reference.set_timesteps(20)
    schedule = NoiseSchedule.from_config(SD)
    ours = karras_sigmas(20, schedule.sigma_min, schedule.sigma_max)
    torch.testing.assert_close(ours.float(), reference.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(make_sigmas(schedule, 20, "karras"), ours)


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("steps", [10, 25])
def test_img2img_steps_match_diffusers(strength, steps):
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    scheduler.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=scheduler)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    sigmas = img2img_sigmas(make_sigmas(NoiseSchedule.from_config(SD), steps, "leading", steps_offset=1), strength)
    assert len(sigmas) - 1 == len(timesteps)
    if len(timesteps):
        torch.testing.assert_close(sigmas[:-1].float(), scheduler.sigmas[-len(timesteps) - 1 : -1], rtol=1e-6, atol=0)


def test_bad_input_is_named():
    schedule = NoiseSchedule.from_config(SD)
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(10, "quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(0)
    with pytest.raises(ValueError, match="strength"):
        img2img_sigmas(make_sigmas(schedule, 10), 1.5)
    with pytest.raises(ValueError, match="timesteps"):
        schedule.sigma_at(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="past the last trained timestep"):
        spaced_timesteps(10, "leading", steps_offset=100)
    with pytest.raises(ValueError, match="final"):
        make_sigmas(schedule, 10, final="one")
    with pytest.raises(ValueError, match="kind"):
        alphas_cumprod_for(ScheduleConfig("sigmoid"))
