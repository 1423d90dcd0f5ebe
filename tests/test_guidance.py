"""Denoiser wrapper and classifier-free guidance against diffusers' pipeline arithmetic."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion.denoiser import Conditioning, Denoiser
from latent_diffusion.diffusion.guidance import ClassifierFreeGuidance
from latent_diffusion.diffusion.schedules import NoiseSchedule, scale_from_vp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012))
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


class RecordingNet:
    """A tiny deterministic network of (x, t, context, y) that remembers how it was called."""

    def __init__(self) -> None:
        self.mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.5
        self.calls: list[dict] = []

    def __call__(self, x, t, context=None, y=None):
        self.calls.append(dict(x=x, t=t, context=context, y=y))
        out = torch.tanh(torch.einsum("ij,bjhw->bihw", self.mix, x[:, :4])) * (1 + t / 1000).view(-1, 1, 1, 1)
        if x.shape[1] > 4:  # image channels concatenated by the denoiser
            out = out + x[:, 4:].mean(1, keepdim=True)
        if context is not None:
            out = out + context.mean(1)[:, :, None, None]
        if y is not None:
            out = out + 0.1 * y.view(-1, 1, 1, 1)
        return out


def conditionings(batch=2):
    g = torch.Generator().manual_seed(11)
    cond = Conditioning(context=torch.randn(batch, 7, 4, generator=g), y=torch.randn(batch, generator=g))
    uncond = Conditioning(context=torch.randn(batch, 7, 4, generator=g), y=torch.randn(batch, generator=g))
    return cond, uncond


@pytest.mark.parametrize("prediction,rescale", [("eps", 0.0), ("v", 0.0), ("v", 0.7)])
def test_guided_estimate_matches_diffusers(prediction, rescale):
    net, (cond, uncond) = RecordingNet(), conditionings()
    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, scale = 500, 7.5
    # diffusers: guide the raw outputs, rescale them, then turn them into x0 with the scheduler's formula.
    outputs = net(torch.cat([x_vp, x_vp]), torch.full((4,), float(t)), torch.cat([uncond.context, cond.context]),
                  torch.cat([uncond.y, cond.y]))
    out_uncond, out_cond = outputs.chunk(2)
    guided = out_uncond + scale * (out_cond - out_uncond)
    if rescale:
        guided = rescale_noise_cfg(guided, out_cond, guidance_rescale=rescale)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=PREDICTIONS[prediction], clip_sample=False)
    scheduler.set_timesteps(10)
    reference = scheduler.step(guided, t, x_vp).pred_original_sample

    sigma = SCHEDULE.sigmas[t]
    guidance = ClassifierFreeGuidance(Denoiser(net, SCHEDULE, prediction), uncond, scale, rescale)
    ours = guidance(scale_from_vp(x_vp, sigma), sigma.expand(2), cond)
    assert_close_to_reference(ours, reference, rel=1e-5)
    assert net.calls[-1]["x"].shape[0] == 4  # cond and uncond in one call
    torch.testing.assert_close(net.calls[-1]["t"], torch.full((4,), float(t)))


def test_scale_one_skips_the_unconditional_pass():
    net, (cond, uncond) = RecordingNet(), conditionings()
    denoiser = Denoiser(net, SCHEDULE, "eps")
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 3.0)
    guided = ClassifierFreeGuidance(denoiser, uncond, scale=1.0)(x, sigma, cond)
    assert len(net.calls) == 1 and net.calls[0]["x"].shape[0] == 2
    torch.testing.assert_close(guided, denoiser(x, sigma, cond))


def test_unconditional_is_broadcast_and_shares_the_image():
    net = RecordingNet()
    cond = Conditioning(context=torch.randn(3, 7, 4), concat=torch.randn(3, 1, 8, 8))
    uncond = Conditioning(context=torch.randn(1, 7, 4))  # one negative prompt for the batch, no image
    guidance = ClassifierFreeGuidance(Denoiser(net, SCHEDULE, "eps"), uncond, scale=5.0)
    guidance(torch.randn(3, 4, 8, 8), torch.full((3,), 2.0), cond)
    call = net.calls[-1]
    assert call["x"].shape == (6, 5, 8, 8)
    torch.testing.assert_close(call["x"][:3, 4:], call["x"][3:, 4:])
    torch.testing.assert_close(call["context"][:3], uncond.context.expand(3, 7, 4))


def test_bad_conditioning_is_named():
    with pytest.raises(ValueError, match="context"):
        Conditioning.cat([Conditioning(context=torch.randn(1, 7, 4)), Conditioning(context=torch.randn(1, 5, 4))])
    with pytest.raises(ValueError, match="'y'"):
        Conditioning.cat([Conditioning(y=torch.zeros(1)), Conditioning()])
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(RecordingNet(), SCHEDULE, "score")
    with pytest.raises(ValueError, match="concat"):
        Denoiser(RecordingNet(), SCHEDULE)(torch.randn(2, 4, 8, 8), 1.0, Conditioning(concat=torch.randn(2, 1, 4, 4)))
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(Denoiser(RecordingNet(), SCHEDULE), Conditioning(), 7.5, rescale=2.0)
    with pytest.raises(ValueError, match="batch"):
        guidance = ClassifierFreeGuidance(Denoiser(RecordingNet(), SCHEDULE), Conditioning(y=torch.zeros(2)), 7.5)
        guidance(torch.randn(3, 4, 8, 8), torch.ones(3), Conditioning(y=torch.zeros(3)))
