"""End-to-end tasks against diffusers' Stable Diffusion pipelines built from the same random weights.

Both sides get the same prompt strings (tokenised by our tokenizer and by transformers' on the same
vocabulary), the same initial noise and generators seeded the same way; images must agree within
2/255 per pixel.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.diffusion.sampling import BatchNoise, make_generators
from latent_diffusion.pipelines.common import Pipeline
from pipeline_tiny import (
    SD_SCHEDULER, TINY_SD1, TINY_SD1_INPAINT, TINY_X4, diffusers_components, diffusers_folder, write_checkpoint,
)

diffusers = pytest.importorskip("diffusers")
TOLERANCE = 2 / 255


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    path = write_checkpoint(TINY_SD1, folder / "tiny-sd1.safetensors")
    return Pipeline.from_checkpoint(path, progress=False), diffusers_components(diffusers_folder(path, folder / "diffusers"))


@pytest.fixture(scope="module")
def sd1_inpaint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1inpaint")
    path = write_checkpoint(TINY_SD1_INPAINT, folder / "tiny-inpaint.safetensors", seed=1)
    return Pipeline.from_checkpoint(path, progress=False), diffusers_components(diffusers_folder(path, folder / "diffusers"))


def _as_array(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])


def _assert_images_match(ours, reference: np.ndarray) -> None:
    ours = _as_array(ours)
    # diffusers returns unrounded floats; ours are 8-bit pixels (half a level of rounding).
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= TOLERANCE, np.abs(ours - reference).max()
    assert ours.std() > 0.02  # not a flat image that would match anything


def _scheduler(name: str):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cls = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler}[name]
    # Our k-diffusion samplers default to "linspace" steps (A1111), which is diffusers' default too.
    return cls(**SD_SCHEDULER, timestep_spacing="linspace")


def _initial_noise(seed: int, batch: int, shape):
    """Our seeded initial noise, and the generators left where our sampler continues drawing."""
    generators = make_generators(seed, batch)
    return BatchNoise(generators).randn((batch, *shape)), generators


def _test_image(size: int, seed: int = 0) -> Image.Image:
    generator = np.random.default_rng(seed)
    base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
    noise = generator.uniform(-40, 40, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_txt2img_matches_stable_diffusion_pipeline(sd1, sampler):
    from diffusers import StableDiffusionPipeline

    pipe, components = sd1
    reference = StableDiffusionPipeline(**components, scheduler=_scheduler(sampler), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    seed, batch, size, steps = 11, 2, 32, 5
    ours = pipe.txt2img("a red circle above a blue square", negative_prompt="blurry", width=size, height=size,
                        steps=steps, sampler=sampler, guidance_scale=6.0, seed=seed, batch_size=batch)
    latents, generators = _initial_noise(seed, batch, (4, size // 4, size // 4))
    with torch.no_grad():
        theirs = reference(["a red circle above a blue square"] * batch, negative_prompt=["blurry"] * batch,
                           height=size, width=size, num_inference_steps=steps, guidance_scale=6.0,
                           latents=latents, generator=generators, output_type="np").images
    _assert_images_match(ours.images, theirs)
    assert ours.seeds == [seed, seed + 1]
    if sampler == "euler":
        # The tolerance is tight enough to tell a one-word change of the prompt.
        other = pipe.txt2img("a red circle above a green square", negative_prompt="blurry", width=size,
                             height=size, steps=steps, sampler=sampler, guidance_scale=6.0, seed=seed)
        assert np.abs(_as_array(other.images) - theirs[:1]).max() > 2 * TOLERANCE


def test_img2img_matches_stable_diffusion_img2img_pipeline(sd1):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, components = sd1
    reference = StableDiffusionImg2ImgPipeline(**components, scheduler=_scheduler("euler"), safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    image = _test_image(32)
    seed, steps, strength = 5, 8, 0.6
    ours = pipe.img2img("a green triangle", image, negative_prompt="", steps=steps, sampler="euler",
                        guidance_scale=5.0, strength=strength, seed=seed, batch_size=2)
    with torch.no_grad():
        theirs = reference(["a green triangle"] * 2, image=image, negative_prompt=[""] * 2,
                           num_inference_steps=steps, strength=strength, guidance_scale=5.0,
                           generator=make_generators(seed, 2), output_type="np").images
    _assert_images_match(ours.images, theirs)
    assert "Denoising strength: 0.6" in ours.parameters[0]


def test_inpaint_with_an_inpainting_model_matches_stable_diffusion_inpaint_pipeline(sd1_inpaint):
    from diffusers import StableDiffusionInpaintPipeline

    pipe, components = sd1_inpaint
    reference = StableDiffusionInpaintPipeline(**components, scheduler=_scheduler("euler"), safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    image = _test_image(32, seed=3)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    seed, steps = 9, 5
    ours = pipe.inpaint("a yellow star", image, mask, steps=steps, sampler="euler", guidance_scale=7.0, seed=seed)
    # The masked image's posterior sample comes first from each generator, then the initial noise.
    generators = make_generators(seed, 1)
    torch.randn((1, 4, 8, 8), generator=generators[0])
    latents = BatchNoise(generators).randn((1, 4, 8, 8))
    with torch.no_grad():
        theirs = reference("a yellow star", image=image, mask_image=mask, height=32, width=32,
                           num_inference_steps=steps, guidance_scale=7.0, latents=latents,
                           generator=make_generators(seed, 1), output_type="np").images
    _assert_images_match(ours.images, theirs)


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("x4")
    path = write_checkpoint(TINY_X4, folder / "tiny-x4.safetensors", seed=2)
    components = diffusers_components(diffusers_folder(path, folder / "diffusers"))
    # SD 2's tokenizer pads with "!" (id 0), as OpenCLIP does.
    components["tokenizer"].pad_token = "!"
    return Pipeline.from_checkpoint(path, progress=False), components


def test_upscale_matches_stable_diffusion_upscale_pipeline(x4):
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionUpscalePipeline

    pipe, components = x4
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    reference = StableDiffusionUpscalePipeline(
        **components, scheduler=EulerDiscreteScheduler(**schedule, prediction_type="v_prediction", steps_offset=1),
        low_res_scheduler=DDPMScheduler(**schedule), max_noise_level=350)
    reference.set_progress_bar_config(disable=True)
    image = _test_image(16, seed=4)
    seed, steps = 21, 4
    ours = pipe.upscale(image, "a sharp photo", negative_prompt="blurry", noise_level=40, steps=steps,
                        sampler="euler", guidance_scale=4.0, seed=seed)
    assert ours.images[0].size == (64, 64)
    generators = make_generators(seed, 1)
    torch.randn((1, 3, 16, 16), generator=generators[0])  # the low-res image's augmentation noise
    latents = BatchNoise(generators).randn((1, 4, 16, 16))
    with torch.no_grad():
        theirs = reference("a sharp photo", image=image, negative_prompt="blurry", noise_level=40,
                           num_inference_steps=steps, guidance_scale=4.0, latents=latents,
                           generator=make_generators(seed, 1), output_type="np").images
    _assert_images_match(ours.images, theirs)


@pytest.mark.slow
def test_full_size_sd15_txt2img_at_256_matches_stable_diffusion_pipeline(tmp_path):
    """SD 1.5's real shapes (random weights), 256x256, two Euler steps with CFG, against diffusers."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latent_diffusion.checkpoints.convert import to_diffusers
    from latent_diffusion.checkpoints.diffusers_configs import unet_config, vae_config
    from latent_diffusion.checkpoints.load import load_state_dict_into_model
    from latent_diffusion.config import SD1
    from pipeline_tiny import random_state, write_clip_tokenizer_files

    state = random_state(SD1)
    named = to_diffusers(SD1, state)
    ours = Pipeline(load_state_dict_into_model(dict(state), spec=SD1), name="sd15-random", progress=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in unet_config(SD1).items() if not k.startswith("_")})
        vae = AutoencoderKL(**{k: v for k, v in vae_config(SD1).items() if not k.startswith("_")})
    unet.load_state_dict(named["unet"], assign=True)
    vae.load_state_dict(named["vae"], assign=True)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu"))
    weights = named["text_encoder"]
    if "embeddings.token_embedding.weight" in text.state_dict():
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    text.load_state_dict(weights)
    folder = write_clip_tokenizer_files(tmp_path)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    reference = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer,
                                        scheduler=_scheduler("euler"), safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    seed, size, steps = 3, 256, 2
    mine = ours.txt2img("a photograph of an astronaut riding a horse", negative_prompt="", width=size, height=size,
                        steps=steps, sampler="euler", guidance_scale=7.5, seed=seed)
    latents, generators = _initial_noise(seed, 1, (4, size // 8, size // 8))
    with torch.no_grad():
        theirs = reference("a photograph of an astronaut riding a horse", height=size, width=size,
                           num_inference_steps=steps, guidance_scale=7.5, latents=latents, generator=generators,
                           output_type="np").images
    _assert_images_match(mine.images, theirs)



# ---------------------------------------------------------------------------------------------- hires fix
def _reference(cls, components, sampler: str):
    pipeline = cls(**components, scheduler=_scheduler(sampler), safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _diffusers_hires(components, upscaler: str, *, prompt, negative, seed, batch, size, steps, guidance,
                     hires_steps, strength):
    """The hires fix as two diffusers calls: txt2img, then img2img on the enlarged image (a resampling
    filter) or the enlarged latents (torch interpolation, A1111's latent modes)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    first = _reference(StableDiffusionPipeline, components, "euler_a")
    second = _reference(StableDiffusionImg2ImgPipeline, components, "euler_a")
    latents, generators = _initial_noise(seed, batch, (4, size // 4, size // 4))
    common = dict(prompt=[prompt] * batch, negative_prompt=[negative] * batch, guidance_scale=guidance)
    with torch.no_grad():
        if upscaler.startswith("Latent"):
            small = first(**common, height=size, width=size, num_inference_steps=steps, latents=latents,
                          generator=generators, output_type="latent").images
            image = torch.nn.functional.interpolate(small, scale_factor=2, mode="bilinear", antialias=False)
        else:
            small = first(**common, height=size, width=size, num_inference_steps=steps, latents=latents,
                          generator=generators, output_type="pil").images
            method = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}[upscaler]
            image = [picture.resize((2 * size, 2 * size), method) for picture in small]
        # A1111 runs exactly `hires_steps` steps: the tail of a schedule of hires_steps / strength steps.
        return second(**common, image=image, num_inference_steps=round(hires_steps / strength), strength=strength,
                      generator=make_generators(seed, batch), output_type="np").images


@pytest.mark.parametrize("upscaler,other", [("Lanczos", "Nearest"), ("Latent", "Latent (nearest)")])
def test_hires_fix_matches_txt2img_then_img2img_in_diffusers(sd1, upscaler, other):
    from latent_diffusion.pipelines.hires import HiresFix

    pipe, components = sd1
    request = dict(prompt="a red circle above a blue square", negative="blurry", seed=7, batch=2, size=32,
                   steps=4, guidance=6.0, hires_steps=3, strength=0.5)
    theirs = _diffusers_hires(components, upscaler, **request)

    def ours(name: str):
        hires = HiresFix(scale=2, upscaler=name, steps=request["hires_steps"], denoising_strength=request["strength"])
        return pipe.txt2img(request["prompt"], negative_prompt=request["negative"], width=32, height=32, steps=4,
                            sampler="euler_a", guidance_scale=6.0, seed=7, batch_size=2, hires=hires)

    result = ours(upscaler)
    _assert_images_match(result.images, theirs)
    assert result.images[0].size == (64, 64) and result.seeds == [7, 8]
    assert "Size: 32x32" in result.parameters[0] and f"Hires upscaler: {upscaler}" in result.parameters[0]
    # The tolerance tells the upscale mode apart.
    assert np.abs(_as_array(ours(other).images) - theirs).max() > 2 * TOLERANCE


def test_hires_fix_with_a_super_resolution_model_matches_diffusers(sd1, x4):
    """The x4 upscaler, its output resized to 2x with Lanczos (as A1111 resizes a model upscaler's), then img2img."""
    from diffusers import (DDPMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline, StableDiffusionUpscalePipeline)
    from latent_diffusion.pipelines.hires import HiresFix

    pipe, components = sd1
    upscaler, x4_components = x4
    seed, guidance, hires_steps, strength = 4, 5.0, 2, 0.5
    hires = HiresFix(scale=2, upscaler=upscaler, steps=hires_steps, denoising_strength=strength)
    ours = pipe.txt2img("a green star", width=32, height=32, steps=3, sampler="euler", guidance_scale=guidance,
                        seed=seed, hires=hires)

    schedule = dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    enlarge = StableDiffusionUpscalePipeline(
        **x4_components, scheduler=EulerDiscreteScheduler(**schedule, prediction_type="v_prediction", steps_offset=1),
        low_res_scheduler=DDPMScheduler(**schedule), max_noise_level=350)
    enlarge.set_progress_bar_config(disable=True)
    first = _reference(StableDiffusionPipeline, components, "euler")
    second = _reference(StableDiffusionImg2ImgPipeline, components, "euler")
    latents, generators = _initial_noise(seed, 1, (4, 8, 8))
    with torch.no_grad():
        small = first("a green star", height=32, width=32, num_inference_steps=3, guidance_scale=guidance,
                      latents=latents, generator=generators, output_type="pil").images[0]
        generators = make_generators(seed, 1)
        torch.randn((1, 3, 32, 32), generator=generators[0])  # the x4 model's augmentation noise
        big = enlarge("a green star", image=small, noise_level=20, num_inference_steps=hires_steps,
                      guidance_scale=guidance, latents=BatchNoise(generators).randn((1, 4, 32, 32)),
                      generator=make_generators(seed, 1), output_type="pil").images[0]
        assert big.size == (128, 128)
        theirs = second("a green star", image=big.resize((64, 64), Image.Resampling.LANCZOS),
                        num_inference_steps=round(hires_steps / strength), strength=strength, guidance_scale=guidance,
                        generator=make_generators(seed, 1), output_type="np").images
    _assert_images_match(ours.images, theirs)
    assert f"Hires upscaler: {upscaler.name}" in ours.parameters[0]
