"""Sampler-level features: seeded per-image noise, img2img, inpainting by latent blending, the registry."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion import samplers
from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.registry import SAMPLERS, get_sampler, resolve_sampler, sampler_names, sigmas_for
from latent_diffusion.diffusion.schedulers import SCHEDULERS
from latent_diffusion.diffusion.sampling import BatchNoise, InpaintingDenoiser, make_generators, sample
from latent_diffusion.diffusion.schedules import NoiseSchedule, make_sigmas, scale_from_vp

# Tiny tensors: a second thread only waits.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012))
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")




def net(x, t, context=None, y=None):
    """Per-image deterministic eps model (no mixing across the batch)."""
    return 0.5 * torch.tanh(x) * (1 + torch.cos(t / 300)).view(-1, 1, 1, 1) + 0.1 * x.roll(1, dims=1)


DENOISER = Denoiser(net, SCHEDULE, "eps")


def test_batch_noise_is_diffusers_randn_tensor_with_generator_list():
    ours = BatchNoise.from_seed(42, 3).randn((3, 4, 8, 8))
    reference = randn_tensor((3, 4, 8, 8), generator=make_generators(42, 3))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "ddim", "dpmpp_2s_ancestral"])
def test_an_image_is_the_same_alone_or_in_a_batch(name):
    spec = SAMPLERS[name]
    sigmas = sigmas_for(spec, SCHEDULE, 8)
    options = {"eta": 1.0} if name == "ddim" else {}
    batch = sample(spec, DENOISER, sigmas, BatchNoise.from_seed(10, 3), shape=(3, 4, 8, 8), **options)
    alone = sample(spec, DENOISER, sigmas, BatchNoise.from_seed(11, 1), shape=(1, 4, 8, 8), **options)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_txt2img_matches_the_diffusers_loop():
    """The whole driver (seeded start and ancestral noise) against EulerAncestral's pipeline loop."""
    steps, shape = 12, (2, 4, 8, 8)
    scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(steps)
    generators = make_generators(5, 2)
    x = randn_tensor(shape, generator=generators) * scheduler.init_noise_sigma  # as the SD pipeline
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t.expand(2)), t, x, generator=generators).prev_sample
    sigmas = make_sigmas(SCHEDULE, steps, "leading", steps_offset=1)
    ours = sample("Euler a", DENOISER, sigmas, BatchNoise.from_seed(5, 2), shape=shape)
    assert_close_to_reference(ours, x, rel=1e-5)


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_img2img_matches_the_diffusers_loop(strength, eta):
    """DDIM img2img as StableDiffusionImg2ImgPipeline runs it: noise the image to the start step, then denoise."""
    steps = 20
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    generators = make_generators(9, 2)
    x = scheduler.add_noise(init, randn_tensor(init.shape, generator=generators), scheduler.timesteps[start : start + 1])
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(net(x, t.expand(2).float()), t, x, eta=eta, generator=generators).prev_sample
    spec = get_sampler("ddim")
    sigmas = sigmas_for(spec, SCHEDULE, steps)
    ours = sample(spec, DENOISER, sigmas, BatchNoise.from_seed(9, 2), init_latent=init, strength=strength, eta=eta)
    assert_close_to_reference(ours, x, rel=1e-5)


def test_inpainting_keeps_the_known_region_and_renoises_it():
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :, :4] = 1
    seen = []

    def recording_net(x, t, context=None, y=None):
        seen.append(x.clone())
        return net(x, t)

    denoiser = Denoiser(recording_net, SCHEDULE, "eps")
    sigmas = sigmas_for(SAMPLERS["dpmpp_2m"], SCHEDULE, 10)
    out = sample("dpmpp_2m", denoiser, sigmas, BatchNoise.from_seed(1, 1), init_latent=init, keep_mask=keep)
    torch.testing.assert_close(out[..., :4], init[..., :4], rtol=0, atol=0)
    assert not torch.allclose(out[..., 4:], init[..., 4:], atol=0.1)
    # Each evaluation sees the known region noised to the current level, with fresh noise each time.
    known_noise = [
        (scale_from_vp(x_vp, sigma) - init)[..., :4] / sigma for x_vp, sigma in zip(seen, sigmas.tolist())
    ]
    for noise in known_noise:
        assert abs(noise.std().item() - 1) < 0.3
    assert not torch.allclose(known_noise[0], known_noise[1], atol=0.1)


def test_inpainting_with_nothing_known_is_img2img_for_deterministic_samplers():
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sigmas = sigmas_for(SAMPLERS["euler"], SCHEDULE, 10)
    plain = sample("euler", DENOISER, sigmas, BatchNoise.from_seed(1, 2), init_latent=init, strength=0.6)
    blended = sample("euler", DENOISER, sigmas, BatchNoise.from_seed(1, 2), init_latent=init, strength=0.6,
                     keep_mask=torch.zeros(1, 1, 8, 8))
    torch.testing.assert_close(blended, plain, rtol=0, atol=0)


def test_registry_names_and_lookup():
    names = sampler_names()
    assert len(names) == len(set(names))
    owners: dict[str, set[str]] = {}
    for spec in SAMPLERS.values():
        for key in (spec.name, spec.label, *spec.aliases):
            owners.setdefault(key.lower(), set()).add(spec.name)
    assert all(len(o) == 1 for o in owners.values()), "two samplers answer to the same name"
    assert get_sampler("euler_a") is get_sampler("Euler a") is SAMPLERS["euler_ancestral"]
    # Samplers are samplers; "DPM++ 2M Karras" is a sampler with a scheduler (tests/test_schedulers.py).
    assert resolve_sampler("DPM++ 2M Karras") == (SAMPLERS["dpmpp_2m"], SCHEDULERS["karras"])
    assert SAMPLERS["dpmpp_2m"].function is samplers.sample_dpmpp_2m
    for required in ("ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral",
                     "euler", "euler_ancestral", "heun", "lms", "uni_pc"):
        assert required in names
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("dpm_fast")
    with pytest.raises(ValueError, match="no option"):
        sample("euler", DENOISER, make_sigmas(SCHEDULE, 4), torch.randn_like, shape=(1, 4, 8, 8), eta=0.5)
    with pytest.raises(ValueError, match="init_latent"):
        sample("euler", DENOISER, make_sigmas(SCHEDULE, 4), torch.randn_like, shape=(1, 4, 8, 8),
               keep_mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="generators"):
        BatchNoise.from_seed(0, 2).randn((3, 4))
    with pytest.raises(ValueError, match="keep_mask"):
        InpaintingDenoiser(DENOISER, torch.zeros(1, 4, 8, 8), torch.ones(8, 8), torch.randn_like)
    with pytest.raises(ValueError, match="decrease"):
        samplers.sample_euler(DENOISER, torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 2.0]))


def test_callback_sees_every_step():
    steps = []
    sigmas = make_sigmas(SCHEDULE, 6, "karras")
    samplers.sample_heun(DENOISER, torch.randn(1, 4, 8, 8) * 15, sigmas, callback=steps.append)
    assert [s.index for s in steps] == list(range(6))
    assert [s.sigma for s in steps] == sigmas[:-1].tolist()
