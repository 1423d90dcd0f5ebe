"""The LCM sampler against diffusers' ``LCMScheduler`` on the same model outputs and the same noise."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_to_reference
from latent_diffusion import cli
from latent_diffusion.config import SD1
from latent_diffusion.diffusion.denoiser import Denoiser
from latent_diffusion.diffusion.registry import get_sampler, sigmas_for
from latent_diffusion.diffusion.sampling import sample
from latent_diffusion.diffusion.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
SHAPE = (2, 4, 8, 8)


def network(x_vp, t, context=None, y=None):
    """A stand-in noise prediction: smooth in the input and the timestep, as a trained UNet's is."""
    t = torch.as_tensor(t, dtype=x_vp.dtype).reshape(-1, *[1] * (x_vp.dim() - 1))
    return torch.sin(1.3 * x_vp + t / 300.0) + 0.1 * x_vp


def _diffusers_trajectory(monkeypatch, noises, steps=None, timesteps=None):
    from diffusers import LCMScheduler
    from diffusers.schedulers import scheduling_lcm

    reference = LCMScheduler(beta_schedule="scaled_linear", beta_start=SD1.schedule.linear_start,
                             beta_end=SD1.schedule.linear_end, num_train_timesteps=1000, clip_sample=False)
    reference.set_timesteps(steps, timesteps=timesteps)
    queue = list(noises[1:])
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: queue.pop(0))
    sample_vp, states = noises[0], []
    for t in reference.timesteps:
        sample_vp = reference.step(network(sample_vp, t), t, sample_vp, return_dict=False)[0]
        states.append(sample_vp)
    return reference.timesteps, states


def _our_trajectory(noises, sigmas, schedule, sampler="LCM", **options):
    queue = [n.double() for n in noises]
    seen = []
    result = sample(get_sampler(sampler), Denoiser(network, schedule, "eps"), sigmas,
                    lambda like: queue.pop(0).to(like.dtype), shape=SHAPE, dtype=torch.float64, schedule=schedule,
                    callback=seen.append, **options)
    # Each step's result in diffusers' (variance-preserving) frame: the next step's input, then the output.
    return [step.x / (1 + step.sigma**2) ** 0.5 for step in seen[1:]] + [result]


@pytest.mark.parametrize("steps", [1, 4, 8, [999, 499, 19]], ids=["1", "4", "8", "down-to-19"])
def test_lcm_trajectory_equals_diffusers_lcm_scheduler(monkeypatch, steps):
    count = steps if isinstance(steps, int) else len(steps)
    generator = torch.Generator().manual_seed(count)
    noises = [torch.randn(SHAPE, generator=generator) for _ in range(count + 1)]
    schedule = NoiseSchedule.from_config(SD1.schedule)
    if isinstance(steps, int):
        timesteps, theirs = _diffusers_trajectory(monkeypatch, noises, steps=steps)
        sigmas = sigmas_for(get_sampler("LCM"), schedule, steps)
        assert torch.equal(schedule.timestep_at(sigmas[:-1]).round().long(), timesteps)
    else:  # near timestep 0 the boundary condition mixes in the input
        timesteps, theirs = _diffusers_trajectory(monkeypatch, noises, timesteps=steps)
        sigmas = torch.cat([schedule.sigma_at(torch.tensor(steps, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64)])
    ours = _our_trajectory(noises, sigmas, schedule)
    assert len(ours) == len(theirs) == count
    # At timestep 19 the boundary condition moves the result by about 7e-6: checked to 1e-6 there
    # (diffusers computes in float32, whose rounding over 4-8 steps approaches 1e-6 elsewhere).
    for mine, reference_state in zip(ours, theirs):
        assert_close_to_reference(mine.float(), reference_state, rel=1e-5 if isinstance(steps, int) else 1e-6)


@pytest.mark.parametrize("steps, gamma", [(1, 0.3), (4, 0.3), (8, 0.3), (4, 0.0), (4, 1.0)],
                         ids=["1", "4", "8", "4-gamma-0", "4-gamma-1"])
def test_tcd_trajectory_equals_diffusers_tcd_scheduler(monkeypatch, steps, gamma):
    from diffusers import TCDScheduler
    from diffusers.schedulers import scheduling_tcd

    generator = torch.Generator().manual_seed(steps)
    noises = [torch.randn(SHAPE, generator=generator) for _ in range(steps + 1)]
    reference = TCDScheduler(beta_schedule="scaled_linear", beta_start=SD1.schedule.linear_start,
                             beta_end=SD1.schedule.linear_end, num_train_timesteps=1000, clip_sample=False)
    reference.set_timesteps(steps)
    queue = list(noises[1:])
    monkeypatch.setattr(scheduling_tcd, "randn_tensor", lambda shape, **kw: queue.pop(0))
    sample_vp, theirs = noises[0], []
    for t in reference.timesteps:
        sample_vp = reference.step(network(sample_vp, t), t, sample_vp, eta=gamma, return_dict=False)[0]
        theirs.append(sample_vp)
    schedule = NoiseSchedule.from_config(SD1.schedule)
    sigmas = sigmas_for(get_sampler("TCD"), schedule, steps)
    assert torch.equal(schedule.timestep_at(sigmas[:-1]).round().long(), reference.timesteps)
    options = {} if gamma == 0.3 else {"gamma": gamma}  # 0.3: the sampler's default, as diffusers'
    ours = _our_trajectory(noises, sigmas, schedule, "TCD", **options)
    assert len(ours) == len(theirs) == steps
    for mine, reference_state in zip(ours, theirs):
        assert_close_to_reference(mine.float(), reference_state, rel=1e-5)


def test_lcm_and_tcd_are_listed_and_default_to_four_steps_on_their_own_schedule(capsys):
    assert cli.main(["samplers"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["lcm"] == ["lcm", "LCM", "4", "stochastic", "lcm"]
    assert rows["tcd"] == ["tcd", "TCD", "4", "stochastic", "lcm,", "ending", "at", "sigma_min"]
    assert rows["trailing"] == ["trailing", "Trailing"]
    with pytest.raises(ValueError, match="LCM schedule has 50 timesteps"):
        sigmas_for(get_sampler("lcm"), NoiseSchedule.from_config(SD1.schedule), 60)


def test_lcm_runs_in_the_pipeline_with_an_lcm_lora_named_in_the_prompt(tmp_path):
    import re

    from latent_diffusion.checkpoints.io import save_safetensors
    from latent_diffusion.pipelines.common import Pipeline
    from lora_tiny import kohya_lora, layers
    from pipeline_tiny import TINY_SD1, write_checkpoint

    checkpoint = write_checkpoint(TINY_SD1, tmp_path / "model.safetensors")
    (tmp_path / "loras").mkdir()
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=tmp_path / "loras")
    # An LCM-LoRA is an ordinary LoRA file (kohya layout, as released for SD 1.5).
    save_safetensors(kohya_lora(layers(pipe.model.unet, re.compile(r".*(to_[qkv]|proj_in|proj_out)")), "lora_unet_"),
                     tmp_path / "loras" / "lcm-lora-sdv1-5.safetensors")
    seen = []
    result = pipe.txt2img("a red circle <lora:lcm-lora-sdv1-5:1>", sampler="LCM", guidance_scale=1.0, width=32,
                          height=32, seed=2, step_callback=lambda step, total: seen.append(round(step.sigma, 4)))
    schedule = pipe.schedule
    assert seen == [round(float(s), 4) for s in schedule.sigma_at(torch.tensor([999.0, 759.0, 499.0, 259.0]))]
    assert "Steps: 4, Sampler: LCM, CFG scale: 1," in result.parameters[0]
    assert 'Lora hashes: "lcm-lora-sdv1-5: ' in result.parameters[0]
