"""Our samplers against diffusers' scheduler loops: same model function, same noise, final latents to 1e-5.

The model is a small deterministic function of (x, t): the exact noise prediction for Gaussian data
plus a nonlinear, time-dependent part, offered as eps- or v-prediction (the same model). Stochastic
samplers get identical seeded generators on both sides, which diffusers' ``randn_tensor`` uses row
by row exactly as our :class:`BatchNoise` does.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_close_to_reference
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion import samplers
from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.sampling import BatchNoise
from latent_diffusion.diffusion.schedules import NoiseSchedule, make_sigmas, scale_from_vp, scale_to_vp

# diffusers' schedulers trip numpy 2's __array__ copy-keyword deprecation on every set_timesteps.
# Tiny tensors: a second thread only waits.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULE = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012))
SHAPE = (2, 4, 8, 8)
DATA_STD = 0.5




class TinyModel:
    """eps of N(0, DATA_STD^2) data at (x_vp, t), plus a small nonlinear term; or the same model as v."""

    def __init__(self, prediction: str) -> None:
        self.prediction = prediction
        self.mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(7)) * 0.5
        self.alphas_cumprod = SCHEDULE.alphas_cumprod.numpy()

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        a = np.interp(t.numpy(), np.arange(1000), self.alphas_cumprod)
        a = torch.tensor(a, dtype=x.dtype).view(-1, 1, 1, 1)
        exact = (1 - a).sqrt() * x / (a * DATA_STD**2 + 1 - a)
        wiggle = torch.tanh(torch.einsum("ij,bjhw->bihw", self.mix.to(x.dtype), x))
        return exact + 0.1 * wiggle * torch.sin(t / 150).to(x.dtype).view(-1, 1, 1, 1)

    def __call__(self, x, t, context=None, y=None):
        eps = self.eps(x, t)
        if self.prediction == "eps":
            return eps
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        a = torch.tensor(np.interp(t.numpy(), np.arange(1000), self.alphas_cumprod), dtype=x.dtype)
        a = a.view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def run_diffusers(scheduler, model, noise, steps, generators=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": generators} if generators is not None else {}
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **extra, **step_kwargs).prev_sample
    return x


def run_ours(sampler, model, x_T, sigmas, *, vp_start, init_scale=1.0, quantize=False, **kwargs):
    denoiser = Denoiser(model, SCHEDULE, model.prediction, quantize_timesteps=quantize)
    x = x_T * init_scale
    if vp_start:  # diffusers' VP schedulers start from x_vp; we integrate x = x_vp * sqrt(1 + sigma^2)
        x = scale_from_vp(x, float(sigmas[0]))
    x = sampler(denoiser, x, sigmas, **kwargs)
    return scale_to_vp(x, float(sigmas[-1])) if sigmas[-1] > 0 else x


def seeded(seed=100):
    return [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]


def initial_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
params = pytest.mark.parametrize("prediction,steps", [(p, n) for p in ("eps", "v") for n in (10, 25)])


def leading(steps):
    return make_sigmas(SCHEDULE, steps, "leading", steps_offset=1)


@params
def test_ddpm(prediction, steps):
    scheduler = DDPMScheduler(**SD, clip_sample=False, prediction_type=PREDICTIONS[prediction], steps_offset=1)
    model, noise = TinyModel(prediction), initial_noise()
    ref = run_diffusers(scheduler, model, noise, steps, seeded())
    ours = run_ours(samplers.sample_ddpm, model, noise, leading(steps), vp_start=True, noise=BatchNoise(seeded()))
    assert_close_to_reference(ours, ref, rel=1e-5)


@params
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim(prediction, steps, eta, spacing):
    # Stable Diffusion's config (set_alpha_to_one=False, steps_offset=1) ends at sigma_min; trailing at 0.
    sd_config = spacing == "leading"
    scheduler = DDIMScheduler(
        **SD, clip_sample=False, set_alpha_to_one=not sd_config, steps_offset=int(sd_config),
        timestep_spacing=spacing, prediction_type=PREDICTIONS[prediction],
    )
    model, noise = TinyModel(prediction), initial_noise()
    ref = run_diffusers(scheduler, model, noise, steps, seeded(), eta=eta)
    sigmas = make_sigmas(
        SCHEDULE, steps, spacing, steps_offset=int(sd_config), final="sigma_min" if sd_config else "zero"
    )
    ours = run_ours(samplers.sample_ddim, model, noise, sigmas, vp_start=True, eta=eta, noise=BatchNoise(seeded()))
    assert_close_to_reference(ours, ref, rel=1e-5)


@params
def test_plms(prediction, steps):
    # diffusers' PNDM combines raw model outputs, so for a v-model it would average v, not eps; the
    # PLMS of CompVis/Stability converts each output to eps first. Feed PNDM that eps view of the model.
    model, noise = TinyModel(prediction), initial_noise()
    scheduler = PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    ref = run_diffusers(scheduler, TinyModel("eps"), noise, steps)
    sigmas = make_sigmas(SCHEDULE, steps, "uniform", final="sigma_min")
    ours = run_ours(samplers.sample_plms, model, noise, sigmas, vp_start=True)
    assert_close_to_reference(ours, ref, rel=1e-5)


K_CASES = {
    # name: (scheduler class, its config, our sampler, our step selection, quantized timesteps)
    "euler": (EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1), samplers.sample_euler, "leading"),
    "euler_trailing": (EulerDiscreteScheduler, dict(timestep_spacing="trailing"), samplers.sample_euler, "trailing"),
    "euler_karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True), samplers.sample_euler, "karras"),
    "heun": (HeunDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1), samplers.sample_heun, "leading"),
    "heun_karras": (HeunDiscreteScheduler, dict(use_karras_sigmas=True), samplers.sample_heun, "karras"),
    "lms": (LMSDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1), samplers.sample_lms, "leading"),
    "lms_karras": (LMSDiscreteScheduler, dict(use_karras_sigmas=True), samplers.sample_lms, "karras"),
}


@params
@pytest.mark.parametrize("case", sorted(K_CASES))
def test_k_samplers(case, prediction, steps):
    cls, config, sampler, spacing = K_CASES[case]
    scheduler = cls(**SD, prediction_type=PREDICTIONS[prediction], **config)
    model, noise = TinyModel(prediction), initial_noise()
    ref = run_diffusers(scheduler, model, noise, steps)
    sigmas = make_sigmas(SCHEDULE, steps, spacing, steps_offset=config.get("steps_offset", 0))
    if cls is not HeunDiscreteScheduler:
        torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    ours = run_ours(sampler, model, noise, sigmas, vp_start=False, init_scale=float(scheduler.init_noise_sigma))
    assert_close_to_reference(ours, ref, rel=1e-5)


@params
def test_euler_ancestral(prediction, steps):
    config = dict(timestep_spacing="leading", steps_offset=1)
    scheduler = EulerAncestralDiscreteScheduler(**SD, prediction_type=PREDICTIONS[prediction], **config)
    model, noise = TinyModel(prediction), initial_noise()
    ref = run_diffusers(scheduler, model, noise, steps, seeded())
    ours = run_ours(
        samplers.sample_euler_ancestral, model, noise, leading(steps), vp_start=False,
        init_scale=float(scheduler.init_noise_sigma), noise=BatchNoise(seeded()),
    )
    assert_close_to_reference(ours, ref, rel=1e-5)


MULTISTEP_CASES = {
    # name: (scheduler class, its config, our sampler, stochastic)
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, samplers.sample_dpmpp_2m, False),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), samplers.sample_dpmpp_2m_sde, True
    ),
    "unipc": (UniPCMultistepScheduler, {}, samplers.sample_unipc, False),
}


@params
@pytest.mark.parametrize("karras", [False, True], ids=["trailing", "karras"])
@pytest.mark.parametrize("case", sorted(MULTISTEP_CASES))
def test_multistep_samplers(case, karras, prediction, steps):
    cls, config, sampler, stochastic = MULTISTEP_CASES[case]
    spacing = dict(use_karras_sigmas=True) if karras else dict(timestep_spacing="trailing")
    scheduler = cls(**SD, prediction_type=PREDICTIONS[prediction], **config, **spacing)
    model, noise = TinyModel(prediction), initial_noise()
    ref = run_diffusers(scheduler, model, noise, steps, seeded() if stochastic else None)
    sigmas = make_sigmas(SCHEDULE, steps, "karras" if karras else "trailing")
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    kwargs = {"noise": BatchNoise(seeded())} if stochastic else {}
    # With Karras sigmas these schedulers give the network the nearest trained timestep.
    ours = run_ours(sampler, model, noise, sigmas, vp_start=True, quantize=karras, **kwargs)
    assert_close_to_reference(ours, ref, rel=1e-5)


def test_ddim_is_euler_when_deterministic():
    model, noise = TinyModel("eps"), initial_noise()
    sigmas = make_sigmas(SCHEDULE, 10, "linspace")
    a = run_ours(samplers.sample_ddim, model, noise, sigmas, vp_start=False, init_scale=math.e)
    b = run_ours(samplers.sample_euler, model, noise, sigmas, vp_start=False, init_scale=math.e)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
