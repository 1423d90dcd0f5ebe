"""Sigma schedules chosen apart from the sampler: every scheduler against its reference, names, old names.

References: diffusers' schedulers where it has the schedule (Karras, exponential, beta, linspace,
DDIM's leading spacing); elsewhere the published formula written out here with NumPy, independently
of the package code (k-diffusion is not installed: its wheel requires torchvision, wandb, kornia...).
The noise levels of Stable Diffusion's schedule come from diffusers' ``alphas_cumprod``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from scipy import stats

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion import samplers
from latent_diffusion.diffusion.analytic import GaussianMixture
from latent_diffusion.diffusion.beta_distribution import beta_cdf, beta_quantile
from latent_diffusion.diffusion.registry import SAMPLERS, SamplerSpec, get_sampler, resolve_sampler, sigmas_for
from latent_diffusion.diffusion.sampling import sample
from latent_diffusion.diffusion.scheduler_functions import polyexponential
from latent_diffusion.diffusion.schedulers import AUTOMATIC, SCHEDULERS, get_scheduler, scheduler_names, scheduler_sigmas
from latent_diffusion.diffusion.schedules import NoiseSchedule, make_sigmas

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

SD_CONFIG = ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012)
SCHEDULE = NoiseSchedule.from_config(SD_CONFIG)
DIFFUSERS_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# Stable Diffusion's trained levels, from diffusers (float64 from its float32 alphas_cumprod).
_ALPHAS_CUMPROD = DDIMScheduler(**DIFFUSERS_SD).alphas_cumprod.double().numpy()
TRAINED = np.sqrt((1 - _ALPHAS_CUMPROD) / _ALPHAS_CUMPROD)
SIGMA_MIN, SIGMA_MAX = TRAINED[0], TRAINED[-1]
STEPS = (1, 2, 7, 10, 20, 33, 50, 100)

# Align Your Steps, 10 steps: the noise levels published with the paper (Sabour et al. 2024).
PUBLISHED_AYS = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def ours(name: str, steps: int, model_kind: str = "sd1") -> torch.Tensor:
    return scheduler_sigmas(SCHEDULERS[name], SCHEDULE, steps, model_kind)


def assert_levels(actual: torch.Tensor, expected, tolerance: float = 1e-6) -> None:
    """Equal within ``tolerance`` relative to each level (absolute for the final 0)."""
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * 1e-3)


def diffusers_euler_sigmas(steps: int, **options) -> np.ndarray:
    scheduler = EulerDiscreteScheduler(**DIFFUSERS_SD, **options)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double().numpy()


def sigma_at(timesteps) -> np.ndarray:
    """k-diffusion's t_to_sigma: log-sigma interpolated linearly between trained timesteps."""
    return np.exp(np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(TRAINED)), np.log(TRAINED)))


def then_zero(levels) -> np.ndarray:
    return np.append(np.asarray(levels, dtype=np.float64), 0.0)


# ---------------------------------------------------------------------------------------- against diffusers
# One step is left out: diffusers' linspace of one timestep is [0], so its range shrinks to sigma_min alone.
@pytest.mark.parametrize("steps", STEPS[1:])
def test_karras_exponential_beta_match_diffusers(steps):
    assert_levels(ours("karras", steps), diffusers_euler_sigmas(steps, use_karras_sigmas=True))
    assert_levels(ours("exponential", steps), diffusers_euler_sigmas(steps, use_exponential_sigmas=True))
    assert_levels(ours("beta", steps), diffusers_euler_sigmas(steps, use_beta_sigmas=True))


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_karras_matches_dpm_solver_too(steps):
    scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SD, use_karras_sigmas=True, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    assert_levels(ours("karras", steps), scheduler.sigmas.double().numpy())


@pytest.mark.parametrize("steps", [2, 4, 10, 28, 38])
def test_uniform_and_normal_match_diffusers_linspace(steps):
    # diffusers interpolates sigma linearly between trained timesteps, k-diffusion log-sigma; these step
    # counts land on whole timesteps, where both agree (the others are checked against the formula).
    reference = diffusers_euler_sigmas(steps, timestep_spacing="linspace")
    assert_levels(ours("uniform", steps), reference)
    assert_levels(ours("normal", steps), reference)


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 10, 20, 50, 100, 250])
def test_ddim_matches_diffusers_leading_spacing_with_offset_one(steps):
    # Where n divides T, CompVis' timesteps 1, 1 + T/n, ... are diffusers' leading spacing with offset 1.
    scheduler = DDIMScheduler(**DIFFUSERS_SD, timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(steps)
    assert_levels(ours("ddim", steps), then_zero(TRAINED[scheduler.timesteps.numpy()]))


# ---------------------------------------------------------------------------------------- against formulas
@pytest.mark.parametrize("steps", STEPS)
def test_uniform_normal_sgm_uniform_are_evenly_spaced_timesteps(steps):
    # k-diffusion's get_sigmas / A1111's normal: n timesteps from T-1 to 0; SGM: the first n of n + 1.
    assert_levels(ours("uniform", steps), then_zero(sigma_at(np.linspace(999, 0, steps))))
    assert_levels(ours("normal", steps), then_zero(sigma_at(np.linspace(999, 0, steps))))
    assert_levels(ours("sgm_uniform", steps), then_zero(sigma_at(np.linspace(999, 0, steps + 1)[:-1])))


@pytest.mark.parametrize("steps", [*STEPS, 3, 9, 30, 300, 999, 1000])
def test_simple_and_ddim_pick_trained_levels(steps):
    # Simple: level T - 1 - floor(k T / n) for k < n. DDIM: levels 1, 1 + T//n, ... below T, descending.
    simple = [TRAINED[999 - math.floor(k * 1000 / steps)] for k in range(steps)]
    assert_levels(ours("simple", steps), then_zero(simple))
    stride = max(1000 // steps, 1)
    assert_levels(ours("ddim", steps), then_zero(TRAINED[np.arange(1, 1000, stride)][::-1]))


@pytest.mark.parametrize("rho", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("steps", STEPS)
def test_polyexponential(steps, rho):
    # log sigma = log sigma_min + (1 - k/(n-1))^rho (log sigma_max - log sigma_min).
    ramp = np.linspace(1, 0, steps) ** rho
    expected = np.exp(np.log(SIGMA_MIN) + ramp * (np.log(SIGMA_MAX) - np.log(SIGMA_MIN)))
    assert_levels(polyexponential(SCHEDULE, steps, rho=rho), then_zero(expected))
    if rho == 1.0 and steps > 1:  # the registered default is the exponential schedule
        assert_levels(ours("polyexponential", steps), diffusers_euler_sigmas(steps, use_exponential_sigmas=True))


@pytest.mark.parametrize("steps", STEPS)
def test_kl_optimal(steps):
    # tan((1 - k/n) atan(sigma_max) + (k/n) atan(sigma_min)), k = 0..n: ends at sigma_min, as A1111's.
    fraction = np.arange(steps + 1) / steps
    expected = np.tan((1 - fraction) * np.arctan(SIGMA_MAX) + fraction * np.arctan(SIGMA_MIN))
    assert_levels(ours("kl_optimal", steps), expected)


@pytest.mark.parametrize("model_kind", ["sd1", "sdxl"])
def test_align_your_steps_is_the_published_table_at_ten_steps(model_kind):
    table = PUBLISHED_AYS[model_kind]
    # Ten steps visit the first ten published levels, then the last step goes to 0.
    assert_levels(ours("align_your_steps", 10, model_kind), table[:-1] + [0.0], tolerance=1e-12)


@pytest.mark.parametrize("model_kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("steps", [1, 2, 5, 9, 11, 15, 20, 32, 50])
def test_align_your_steps_interpolates_log_linearly(model_kind, steps):
    # n steps: n + 1 levels at evenly spaced positions of the table, log-sigma linear between entries.
    table = np.asarray(PUBLISHED_AYS[model_kind])
    positions = np.linspace(0, 1, steps + 1)
    levels = np.exp(np.interp(positions, np.linspace(0, 1, len(table)), np.log(table)))
    levels[-1] = 0.0
    assert_levels(ours("align_your_steps", steps, model_kind), levels)


def test_align_your_steps_uses_the_sd15_table_for_other_families():
    torch.testing.assert_close(ours("align_your_steps", 12, "sd2"), ours("align_your_steps", 12, "sd1"))
    assert not torch.allclose(ours("align_your_steps", 12, "sdxl"), ours("align_your_steps", 12, "sd1"))


def test_beta_quantile_against_scipy():
    for a, b in [(0.6, 0.6), (2.0, 5.0), (0.3, 3.0), (1.0, 1.0)]:
        p = np.concatenate([[0.0, 1e-9], np.linspace(0, 1, 101), [1 - 1e-9, 1.0]])
        np.testing.assert_allclose(beta_cdf(p, a, b), stats.beta.cdf(p, a, b), rtol=0, atol=1e-13)
        np.testing.assert_allclose(beta_quantile(p, a, b), stats.beta.ppf(p, a, b), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="a > 0"):
        beta_quantile(np.array([0.5]), 0.0, 1.0)


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "automatic"])
def test_every_scheduler_decreases_and_samples_reach_the_data(name):
    sigmas = ours(name, 100)
    assert len(sigmas) == 101 and sigmas.dtype == torch.float64
    assert (sigmas[1:] < sigmas[:-1]).all() and sigmas[-1] >= 0
    mixture = GaussianMixture(weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
                              means=torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64),
                              stds=torch.tensor([0.3, 0.5], dtype=torch.float64))
    torch.manual_seed(0)
    x = sample("dpmpp_2m", mixture.denoise, sigmas, torch.randn_like, shape=(20000, 2), dtype=torch.float64)
    # 0.04 is about five standard errors of the 20000-sample mean / std estimates.
    torch.testing.assert_close(x.mean(0), mixture.mean, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), mixture.std, atol=0.04, rtol=0)


# ---------------------------------------------------------------------------------------- names
def test_names_labels_and_aliases():
    assert scheduler_names()[0] == "automatic" and get_scheduler(None) is get_scheduler("") is AUTOMATIC
    labels = {spec.label for spec in SCHEDULERS.values()}
    assert {"Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "Simple", "Normal",
            "DDIM", "Beta", "Align Your Steps", "KL Optimal", "Trailing"} == labels
    assert get_scheduler("karras") is get_scheduler("Karras") is get_scheduler(" KARRAS ") is SCHEDULERS["karras"]
    assert get_scheduler("SGMUniform") is SCHEDULERS["sgm_uniform"]
    with pytest.raises(ValueError, match="unknown scheduler 'wobbly'.*karras \\(Karras\\).*beta \\(Beta\\)"):
        get_scheduler("wobbly")
    with pytest.raises(ValueError, match="sampler's own"):
        scheduler_sigmas(AUTOMATIC, SCHEDULE, 10)
    with pytest.raises(ValueError, match="repeats a noise level"):
        scheduler_sigmas(SCHEDULERS["simple"], NoiseSchedule.from_config(ScheduleConfig(timesteps=10)), 20)


# The combined names the sampler registry had before schedulers were chosen apart, and their parts.
OLD_COMBINED = {
    "lms_karras": "lms", "LMS Karras": "lms",
    "dpmpp_2s_ancestral_karras": "dpmpp_2s_ancestral", "DPM++ 2S a Karras": "dpmpp_2s_ancestral",
    "dpmpp_2m_karras": "dpmpp_2m", "DPM++ 2M Karras": "dpmpp_2m",
    "dpmpp_2m_sde_karras": "dpmpp_2m_sde", "DPM++ 2M SDE Karras": "dpmpp_2m_sde",
}


@pytest.mark.parametrize("old_name", sorted(OLD_COMBINED))
@pytest.mark.parametrize("steps", [3, 20, 37])
def test_old_combined_names_give_bitwise_the_old_sigmas(old_name, steps):
    sampler, scheduler = resolve_sampler(old_name)
    assert sampler is SAMPLERS[OLD_COMBINED[old_name]] and scheduler is SCHEDULERS["karras"]
    # The old registry entry: the sampler with spacing "karras", run through make_sigmas.
    old_entry = SamplerSpec(old_name, old_name, sampler.function, spacing="karras", stochastic=sampler.stochastic)
    old = sigmas_for(old_entry, SCHEDULE, steps)
    torch.testing.assert_close(sigmas_for(sampler, SCHEDULE, steps, scheduler=scheduler), old, rtol=0, atol=0)
    torch.testing.assert_close(old, make_sigmas(SCHEDULE, steps, "karras"), rtol=0, atol=0)


def test_sampler_and_scheduler_names_combine():
    assert resolve_sampler("Euler a") == (SAMPLERS["euler_ancestral"], AUTOMATIC)
    assert resolve_sampler("DPM++ 2M", "Karras") == (SAMPLERS["dpmpp_2m"], SCHEDULERS["karras"])
    assert resolve_sampler("dpmpp_2m_karras", "Automatic") == (SAMPLERS["dpmpp_2m"], SCHEDULERS["karras"])
    assert resolve_sampler("DPM++ 2M Karras", "karras") == (SAMPLERS["dpmpp_2m"], SCHEDULERS["karras"])
    assert resolve_sampler("euler_a_sgm_uniform") == (SAMPLERS["euler_ancestral"], SCHEDULERS["sgm_uniform"])
    assert resolve_sampler("DPM++ 2M SDE Exponential") == (SAMPLERS["dpmpp_2m_sde"], SCHEDULERS["exponential"])
    assert resolve_sampler("DDIM") == (SAMPLERS["ddim"], AUTOMATIC)
    assert resolve_sampler("Euler Align Your Steps") == (SAMPLERS["euler"], SCHEDULERS["align_your_steps"])
    with pytest.raises(ValueError, match="already chooses the Karras scheduler.*'Exponential'"):
        resolve_sampler("DPM++ 2M Karras", "exponential")
    with pytest.raises(ValueError, match="unknown scheduler 'wobbly'"):
        resolve_sampler("DPM++ 2M", "wobbly")
    with pytest.raises(ValueError, match="unknown sampler 'DPM\\+\\+ 9M'"):
        resolve_sampler("DPM++ 9M")
    with pytest.raises(ValueError, match="with the scheduler 'Karras'"):
        get_sampler("DPM++ 2M Karras")


def test_a_scheduler_replaces_the_samplers_own_steps():
    ddim = SAMPLERS["ddim"]
    own = sigmas_for(ddim, SCHEDULE, 10)
    assert own[-1] == SCHEDULE.sigma_min  # DDIM's own schedule ends at the smallest trained level
    torch.testing.assert_close(sigmas_for(ddim, SCHEDULE, 10, scheduler="karras"), ours("karras", 10))
    torch.testing.assert_close(sigmas_for(ddim, SCHEDULE, None, scheduler="karras"), ours("karras", 50))
    torch.testing.assert_close(sigmas_for(SAMPLERS["euler"], SCHEDULE, 10, scheduler="AYS", model_kind="sdxl"),
                               ours("align_your_steps", 10, "sdxl"))
    with pytest.raises(ValueError, match="own schedule"):
        sigmas_for(ddim, SCHEDULE, 10, scheduler="karras", spacing="leading")


def test_sample_accepts_a_combined_name_for_its_sampler():
    sigmas = ours("karras", 5)

    def denoise(x, sigma, cond=None):
        return 0.5 * x

    def ones(like):
        return torch.ones_like(like)

    by_name = sample("dpmpp_2m_karras", denoise, sigmas, ones, shape=(2, 3), dtype=torch.float64)
    start = torch.ones(2, 3, dtype=torch.float64) * (1 + float(sigmas[0]) ** 2) ** 0.5
    torch.testing.assert_close(by_name, samplers.sample_dpmpp_2m(denoise, start, sigmas), rtol=0, atol=0)
