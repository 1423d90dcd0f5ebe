"""Image to image (SDEdit, Meng et al. 2022): noise the image's latent to ``strength``, denoise under the prompt."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from latent_diffusion.diffusion.sampling import BatchNoise
from latent_diffusion.pipelines.common import GenerationResult, Pipeline, SamplingSettings, StepCallback
from latent_diffusion.pipelines.control import ControlUnit, check_units, with_defaults
from latent_diffusion.pipelines.control_images import control_for_batch
from latent_diffusion.pipelines.refiner import Refiner, prepare_refiner
from latent_diffusion.pipelines.text_conditioning import MicroConditioning
from latent_diffusion.pipelines.images import check_size, image_to_tensor, to_rgb
from latent_diffusion.pipelines.txt2img import check_text_model


def _number(value: float) -> str:
    return f"{value:g}"


def prepare_image(image: Image.Image | None, width: int | None, height: int | None, multiple: int,
                  *, what: str = "init image") -> Image.Image:
    """The input image in RGB at the requested size (resized when a size is given, else checked as it is)."""
    if image is None:
        raise ValueError(f"an {what} is required")
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} must be a PIL image, got {type(image).__name__}")
    image = to_rgb(image, what=what)
    width = width or image.width
    height = height or image.height
    check_size(width, height, multiple)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def check_strength(strength: float) -> float:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength (denoising strength) must be in (0, 1], got {strength}")
    return float(strength)


def img2img(
    pipe: Pipeline,
    prompt: str = "",
    image: Image.Image | None = None,
    *,
    negative_prompt: str = "",
    strength: float = 0.75,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    sampler: str = "euler_a",
    scheduler: str | None = None,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    batch_size: int = 1,
    batch_count: int = 1,
    clip_skip: int | None = None,
    step_callback: StepCallback | None = None,
    micro_conditioning: MicroConditioning | None = None,
    refiner: Refiner | None = None,
    control: Sequence[ControlUnit] | None = None,
) -> GenerationResult:
    """Redraw ``image`` towards ``prompt``; ``strength`` 1 ignores the image, small values keep it.

    ``refiner`` takes the latents over for the last part of the schedule (as in txt2img); ``control``:
    ControlNet units (a unit without an image is controlled by ``image``, as in A1111).
    """
    check_text_model(pipe, "img2img")
    settings = SamplingSettings.make(sampler, steps, guidance_scale, step_callback, scheduler)
    strength = check_strength(strength)
    image = prepare_image(image, width, height, max(8, pipe.latent_factor))
    pixels = image_to_tensor(image)
    check_units(pipe, control or [])
    control = with_defaults(control or [], image, None)
    if refiner is not None:
        refiner.check_fits(pipe)
    extra = {"Denoising strength": _number(strength), "Clip skip": clip_skip,
             **(refiner.parameters() if refiner else {}),
             **(micro_conditioning.parameters() if micro_conditioning else {})}

    def run_batch(first_seed: int, generators: list[torch.Generator]) -> GenerationResult:
        batch = len(generators)
        cond, uncond = pipe.text_conditioning(prompt, negative_prompt, batch, clip_skip, width=image.width, height=image.height,
                                               micro=micro_conditioning)
        init_latent = pipe.encode_images(pixels.expand(batch, -1, -1, -1), generators)
        refine = prepare_refiner(refiner, prompt, negative_prompt, batch, width=image.width,
                                 height=image.height, micro=micro_conditioning)
        result = GenerationResult()
        controls = control_for_batch(pipe, control, image.width, image.height, first_seed, result)
        latents = pipe.sample_latents(settings, BatchNoise(generators), cond, uncond, init_latent=init_latent,
                                      strength=strength, refine=refine, control=controls)
        result.images = (refiner.pipe if refiner else pipe).to_images(latents, result.warnings)
        result.seeds = [first_seed + i for i in range(batch)]
        result.parameters = [pipe.parameters_text(prompt, negative_prompt, settings, s, image.width, image.height,
                                                  {**extra, **(controls.parameters() if controls else {})})
                             for s in result.seeds]
        return result

    return pipe.run_batches(seed, batch_size, batch_count, run_batch)
