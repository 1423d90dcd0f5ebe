"""ControlNet in the tasks: the tiny pipeline against diffusers' StableDiffusionControlNetPipeline
(same random weights, one and two ControlNets, guidance start/end), control modes, every sampler,
img2img and inpaint, lean and bf16 modes, and bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_to_reference
from controlnet_tiny import TINY_CONTROLNET, diffusers_twin, random_controlnet
from latent_diffusion.checkpoints.controlnet import save_controlnet
from latent_diffusion.diffusion.sampling import make_generators
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


def test_img2img_with_guidance_end_matches_the_controlnet_img2img_pipeline(sd1, controlnets):  # noqa: F811
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    pipe, components = sd1
    reference = StableDiffusionControlNetImg2ImgPipeline(
        **components, controlnet=diffusers_twin(controlnets[0].model), scheduler=_scheduler("euler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    image, control = _test_image(32, seed=5), _control_image(3)
    seed, steps, strength = 5, 8, 0.75  # 6 steps run; the ControlNet takes the first half of them
    unit = ControlUnit(controlnets[0], control, weight=1.5, guidance_end=0.5)
    ours = pipe.img2img("a green triangle", image, steps=steps, sampler="euler", guidance_scale=5.0,
                        strength=strength, seed=seed, control=[unit])
    with torch.no_grad():
        theirs = reference("a green triangle", image=image, control_image=control, num_inference_steps=steps,
                           strength=strength, guidance_scale=5.0, generator=make_generators(seed, 1),
                           output_type="np", controlnet_conditioning_scale=1.5, control_guidance_end=0.5).images
    _assert_images_match(ours.images, theirs)


class _Recorder:
    """A UNet callable that records what it is given and answers zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros_like(x)


@pytest.mark.parametrize("mode", ["Balanced", "My prompt is more important", "ControlNet is more important"])
def test_control_modes_weigh_residuals_as_a1111(sd1, controlnets, mode):  # noqa: F811
    from latent_diffusion.pipelines.control_images import prepare_controls

    pipe, _ = sd1
    unit = ControlUnit(controlnets[0], _control_image(4), weight=0.9, control_mode=mode)
    control = prepare_controls(pipe, [unit], 32, 32, seed=0)
    recorder = _Recorder()
    layer = control.layer(recorder, pipe.schedule, torch.tensor([14.6, 3.0, 0.0]), guided=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator).expand(2, -1, -1, -1)  # CFG: the same x twice
    context = torch.randn(2, 77, 32, generator=generator)  # unconditional first
    t = torch.full((2,), 500.0)
    layer(x, t, context=context, y=None)
    residuals = recorder.calls[0]["control"]
    with torch.no_grad():
        plain = controlnets[0].model(x, control.controls[0].hint.expand(2, -1, -1, -1), t, context)
    count = len(plain)
    scales = [0.9] * count if mode == "Balanced" else [0.9 * 0.825 ** (12 - i) for i in range(count)]
    for got, raw, scale in zip(residuals, plain, scales):
        if mode == "ControlNet is more important":
            assert torch.equal(got[0], torch.zeros_like(got[0]))  # the unconditional half gets none
            assert_close_to_reference(got[1], raw[1] * scale)  # computed alone: a batch of one
        else:
            assert_close_to_reference(got, raw * scale)


def test_step_of_a_model_evaluation_and_inactive_steps_pass_no_control(sd1, controlnets):  # noqa: F811
    from latent_diffusion.pipelines.control_images import prepare_controls

    pipe, _ = sd1
    unit = ControlUnit(controlnets[0], _control_image(4), guidance_start=0.5)
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])
    layer = prepare_controls(pipe, [unit], 32, 32, seed=0).layer(_Recorder(), pipe.schedule, sigmas, guided=False)
    timesteps = pipe.schedule.timestep_at(sigmas[:-1].double()).float()
    midway = pipe.schedule.timestep_at(torch.tensor(4.0, dtype=torch.float64)).float()
    assert [layer.step_of(t) for t in timesteps] == [0, 1, 2, 3]
    assert layer.step_of(midway) == 1  # a midpoint evaluation belongs to the step it lies in
    x, context = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    for t in timesteps:
        layer(x, t.expand(1), context=context, y=None)
    assert ["control" in call for call in layer.network.calls] == [False, False, True, True]


def test_every_sampler_runs_with_control(sd1, controlnets):  # noqa: F811
    from latent_diffusion.diffusion.registry import SAMPLERS

    pipe, _ = sd1
    unit = ControlUnit(controlnets[0], _control_image(5), weight=2.0, guidance_start=0.3)
    for name in SAMPLERS:
        controlled = pipe.txt2img("a star", width=32, height=32, steps=3, sampler=name, seed=1, control=[unit])
        plain = pipe.txt2img("a star", width=32, height=32, steps=3, sampler=name, seed=1)
        assert np.abs(_as_array(controlled.images) - _as_array(plain.images)).max() > 0.02, name


def test_img2img_and_inpaint_take_the_init_image_when_a_unit_has_none(sd1, controlnets):  # noqa: F811
    pipe, _ = sd1
    image = _test_image(32, seed=6)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    options = dict(steps=4, sampler="euler", seed=2, guidance_scale=4.0)
    for task, args in (("img2img", (image,)), ("inpaint", (image, mask))):
        run = getattr(pipe, task)
        implicit = run("a cat", *args, control=[ControlUnit(controlnets[1], weight=1.5)], **options)
        explicit = run("a cat", *args, control=[ControlUnit(controlnets[1], image, weight=1.5)], **options)
        plain = run("a cat", *args, **options)
        assert np.array_equal(_as_array(implicit.images), _as_array(explicit.images)), task
        assert np.abs(_as_array(implicit.images) - _as_array(plain.images)).max() > 0.02, task
    with pytest.raises(ValueError, match="has no control image"):
        pipe.txt2img("a cat", width=32, height=32, control=[ControlUnit(controlnets[1])])


def test_inpaint_preprocessor_marks_the_masked_pixels(sd1, controlnets):  # noqa: F811
    from latent_diffusion.pipelines.control_images import prepare_controls

    pipe, _ = sd1
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    unit = ControlUnit(controlnets[0], _test_image(32), module="inpaint", mask=mask)
    hint = prepare_controls(pipe, [unit], 32, 32, seed=0).controls[0].hint
    assert torch.all(hint[..., :16] == -1) and torch.all(hint[..., 16:] >= 0)


def test_dedicated_inpainting_model_gets_the_latent_channels_only(tmp_path, controlnets):
    from latent_diffusion.pipelines.common import Pipeline
    from pipeline_tiny import TINY_SD1_INPAINT, write_checkpoint

    pipe = Pipeline.from_checkpoint(write_checkpoint(TINY_SD1_INPAINT, tmp_path / "inpaint.safetensors", seed=1),
                                    progress=False)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    options = dict(steps=3, sampler="euler", seed=2)
    controlled = pipe.inpaint("a cat", _test_image(32), mask, control=[ControlUnit(controlnets[0], _control_image(6))],
                              **options)
    plain = pipe.inpaint("a cat", _test_image(32), mask, **options)
    assert np.abs(_as_array(controlled.images) - _as_array(plain.images)).max() > 0.02


def test_lean_and_bf16_modes_run_the_controlnet_their_way(tmp_path, controlnets):
    from latent_diffusion.nn.bf16 import has_native_bf16
    from latent_diffusion.nn.lean import make_lean
    from latent_diffusion.pipelines.common import Pipeline
    from latent_diffusion.pipelines.control import controlnet_dtype
    from pipeline_tiny import TINY_SD1, write_checkpoint

    path = write_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors")
    saved = save_controlnet(controlnets[0].model, tmp_path / "cn.safetensors")
    options = dict(width=32, height=32, steps=4, sampler="euler", guidance_scale=5.0, seed=3)
    exact = Pipeline.from_checkpoint(path, progress=False)
    reference = _as_array(exact.txt2img("a red circle", control=[ControlUnit(load_controlnet_for(exact, saved),
                                                                             _control_image(7))], **options).images)
    lean = Pipeline.from_checkpoint(path, progress=False, lean=True)
    # Tiny blocks stored in fp16 too (all but the timestep MLP, from which the UNet takes its compute dtype).
    keep = sum(p.numel() for p in lean.model.unet.time_embed.parameters()) + 1
    make_lean(lean.model.unet, unit_parameters=200_000, min_parameters=keep)
    assert controlnet_dtype(lean) == (torch.float16, True)
    modes = [(lean, load_controlnet_for(lean, saved))]
    if has_native_bf16("cpu"):
        bf16 = Pipeline.from_checkpoint(path, progress=False, bf16=True)
        modes.append((bf16, load_controlnet_for(bf16, saved)))
    for pipe, controlnet in modes:
        image = _as_array(pipe.txt2img("a red circle", control=[ControlUnit(controlnet, _control_image(7))],
                                       **options).images)
        psnr = 10 * np.log10(1 / max(((image - reference) ** 2).mean(), 1e-12))
        assert psnr >= 25, (pipe.bf16, psnr)


def test_bad_units_are_refused_with_clear_errors(sd1, controlnets, tmp_path):  # noqa: F811
    pipe, _ = sd1
    image = _control_image(0)
    with pytest.raises(ValueError, match="weight must be a number, got 'strong'"):
        ControlUnit(controlnets[0], image, weight="strong")
    with pytest.raises(ValueError, match=r"weight must be in \[0, 2\], got 3"):
        ControlUnit(controlnets[0], image, weight=3)
    with pytest.raises(ValueError, match=r"guidance start \(0.8\) is after its end \(0.2\)"):
        ControlUnit(controlnets[0], image, guidance_start=0.8, guidance_end=0.2)
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'sobel'; choose one of"):
        ControlUnit(controlnets[0], image, module="sobel")
    with pytest.raises(ValueError, match="ControlNet image must be an image, got str"):
        ControlUnit(controlnets[0], "edges.png")
    with pytest.raises(ValueError, match="unknown ControlNet control mode 'loud'"):
        ControlUnit(controlnets[0], image, control_mode="loud")
    other = save_controlnet(random_controlnet(dataclasses.replace(
        TINY_CONTROLNET, unet=dataclasses.replace(TINY_CONTROLNET.unet, context_dim=1024))), tmp_path / "sd2ish.safetensors")
    with pytest.raises(ValueError, match="'sd2ish' is an SD 2.x ControlNet and does not fit"):
        load_controlnet_for(pipe, other)


def test_sdxl_controlnet_takes_the_adm_vector_and_steers_the_image(tmp_path):
    from latent_diffusion.models.controlnet import controlnet_config_for
    from latent_diffusion.pipelines.common import Pipeline
    from pipeline_tiny import TINY_SDXL, write_checkpoint

    pipe = Pipeline.from_checkpoint(write_checkpoint(TINY_SDXL, tmp_path / "xl.safetensors"), progress=False)
    config = controlnet_config_for(TINY_SDXL.unet, hint_widths=(16, 32, 64))
    loaded = load_controlnet_for(pipe, save_controlnet(random_controlnet(config, seed=3), tmp_path / "cn.safetensors"))
    assert loaded.config == config and loaded.model.config.num_classes == "sequential"
    options = dict(width=32, height=32, steps=3, sampler="euler", seed=1, guidance_scale=5.0)
    controlled = pipe.txt2img("a star", control=[ControlUnit(loaded, _control_image(8), control_mode="prompt")],
                              **options)
    plain = pipe.txt2img("a star", **options)
    assert np.abs(_as_array(controlled.images) - _as_array(plain.images)).max() > 0.02


def test_a_lora_under_control_is_the_lora_merged_by_hand(tmp_path, controlnets):
    import re

    from latent_diffusion.addons.lora_file import read_lora_file
    from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
    from latent_diffusion.checkpoints.io import save_safetensors
    from latent_diffusion.pipelines.common import Pipeline
    from lora_tiny import kohya_lora, layers
    from pipeline_tiny import TINY_SD1, write_checkpoint

    path = write_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors")
    (tmp_path / "loras").mkdir()
    pipe = Pipeline.from_checkpoint(path, progress=False, lora_dir=tmp_path / "loras")
    attention = re.compile(r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
    lora = tmp_path / "loras" / "style.safetensors"
    save_safetensors(kohya_lora(layers(pipe.model.unet, attention), "lora_unet_", seed=4, scale=0.5), lora)
    saved = save_controlnet(controlnets[0].model, tmp_path / "cn.safetensors")
    unit = ControlUnit(load_controlnet_for(pipe, saved), _control_image(5), weight=0.9)
    options = dict(width=32, height=32, steps=3, sampler="euler", guidance_scale=5.0, seed=2, control=[unit])

    tagged = _as_array(pipe.txt2img("a red circle <lora:style:1>", **options).images)
    plain = _as_array(pipe.txt2img("a red circle", **options).images)
    merged = MergedLoras(pipe.model, pipe.family, pipe.spec)
    merged.apply([LoraUse(read_lora_file(lora), unet=1.0, text=1.0)])
    pipe.weights_changed()
    by_hand = _as_array(pipe.txt2img("a red circle", **options).images)
    assert np.abs(tagged - plain).max() > 0.02  # the LoRA changes the controlled image
    np.testing.assert_array_equal(tagged, by_hand)
