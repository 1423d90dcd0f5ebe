"""ControlNet in the tasks: the tiny pipeline against diffusers' StableDiffusionControlNetPipeline
(same random weights, one and two ControlNets, guidance start/end), control modes, every sampler,
img2img and inpaint, lean and bf16 modes, and bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_tiny import TINY_CONTROLNET, diffusers_twin, random_controlnet
from latent_diffusion.checkpoints.controlnet import save_controlnet
from latent_diffusion.pipelines.control import ControlUnit, load_controlnet_for
from test_pipeline_oracle import _as_array, _assert_images_match, _initial_noise, _scheduler, _test_image, sd1  # noqa: F401

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def controlnets(sd1, tmp_path_factory):  # noqa: F811
    pipe, _components = sd1
    folder = tmp_path_factory.mktemp("controlnets")
    paths = [save_controlnet(random_controlnet(seed=seed), folder / f"control_{seed}.safetensors") for seed in (1, 2)]
    return [load_controlnet_for(pipe, path) for path in paths]


def _control_image(seed: int) -> Image.Image:
    """A 32 px map of a few shapes (what a ControlNet's input looks like), not noise."""
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        top, left = rng.integers(0, 24, 2)
        array[top:top + 8, left:left + 8] = rng.integers(64, 256, 3)
    return Image.fromarray(array)


def _reference(components, controlnets, sampler="euler"):
    from diffusers import StableDiffusionControlNetPipeline

    twins = [diffusers_twin(c.model) for c in controlnets]
    reference = StableDiffusionControlNetPipeline(
        **components, controlnet=twins[0] if len(twins) == 1 else twins, scheduler=_scheduler(sampler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return reference


def test_one_controlnet_matches_stable_diffusion_controlnet_pipeline(sd1, controlnets):  # noqa: F811
    pipe, components = sd1
    reference = _reference(components, controlnets[:1])
    image = _control_image(0)
    seed, batch, steps = 3, 2, 5
    unit = ControlUnit(controlnets[0], image, weight=0.8)
    ours = pipe.txt2img("a red circle", negative_prompt="blurry", width=32, height=32, steps=steps, sampler="euler",
                        guidance_scale=6.0, seed=seed, batch_size=batch, control=[unit])
    latents, generators = _initial_noise(seed, batch, (4, 8, 8))
    with torch.no_grad():
        theirs = reference(["a red circle"] * batch, image=image, negative_prompt=["blurry"] * batch, height=32,
                           width=32, num_inference_steps=steps, guidance_scale=6.0, latents=latents,
                           generator=generators, output_type="np", controlnet_conditioning_scale=0.8).images
    _assert_images_match(ours.images, theirs)
    plain = pipe.txt2img("a red circle", negative_prompt="blurry", width=32, height=32, steps=steps, sampler="euler",
                         guidance_scale=6.0, seed=seed, batch_size=batch)
    assert np.abs(_as_array(plain.images) - theirs).max() > 0.1  # the ControlNet changed the image
    assert f'ControlNet 0: "Module: none, Model: control_1 [{controlnets[0].hash}], Weight: 0.8, Resize Mode: ' \
           'Crop and Resize, Processor Res: 512, Threshold A: 0.0, Threshold B: 0.0, Guidance Start: 0.0, ' \
           'Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"' in ours.parameters[0]
    assert ours.control_maps[0].size == (32, 32)


def test_two_controlnets_with_guidance_start_and_end_match_the_multi_controlnet_pipeline(sd1, controlnets):  # noqa: F811
    pipe, components = sd1
    reference = _reference(components, controlnets)
    images = [_control_image(1), _control_image(2)]
    seed, steps = 7, 5
    units = [ControlUnit(controlnets[0], images[0], weight=1.2, guidance_start=0.2, guidance_end=0.8),
             ControlUnit(controlnets[1], images[1], weight=0.7, guidance_end=0.6)]
    ours = pipe.txt2img("a blue square", width=32, height=32, steps=steps, sampler="euler", guidance_scale=5.0,
                        seed=seed, control=units)
    latents, generators = _initial_noise(seed, 1, (4, 8, 8))
    with torch.no_grad():
        theirs = reference("a blue square", image=images, height=32, width=32, num_inference_steps=steps,
                           guidance_scale=5.0, latents=latents, generator=generators, output_type="np",
                           controlnet_conditioning_scale=[1.2, 0.7], control_guidance_start=[0.2, 0.0],
                           control_guidance_end=[0.8, 0.6]).images
    _assert_images_match(ours.images, theirs)
    always = pipe.txt2img("a blue square", width=32, height=32, steps=steps, sampler="euler", guidance_scale=5.0,
                          seed=seed, control=[dataclasses.replace(u, guidance_start=0.0, guidance_end=1.0) for u in units])
    assert np.abs(_as_array(always.images) - theirs).max() > 2 * 2 / 255  # start and end made a difference
