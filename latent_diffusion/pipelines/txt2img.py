"""Text to image: sample a latent from noise under the prompt, decode it."""
from __future__ import annotations

from typing import Sequence

import torch

from latent_diffusion.diffusion.sampling import BatchNoise
from latent_diffusion.pipelines.common import GenerationResult, Pipeline, SamplingSettings, StepCallback
from latent_diffusion.pipelines.control import ControlUnit, check_units, with_defaults
from latent_diffusion.pipelines.control_images import control_for_batch
from latent_diffusion.pipelines.hires import FirstPass, HiresFix, plan_hires, second_pass
from latent_diffusion.pipelines.refiner import Refiner, prepare_refiner
from latent_diffusion.pipelines.text_conditioning import MicroConditioning


HIRES_WITHOUT_CONTROL = "the hires fix's second pass ran without ControlNet (it steers the first pass)"
EMPTY_PROMPT = "the prompt is empty: the images are unconditional (whatever the model draws without a description)"


def check_text_model(pipe: Pipeline, task: str) -> None:
    """Refuse tasks that need a text-conditioned model with plain latent input (not inpainting/upscaler UNets)."""
    if task == "txt2img" and pipe.family.finishes_only:
        raise ValueError(f"{pipe.name!r} is a {pipe.spec.family!r} model ({pipe.family.description}); it cannot start "
                         "from noise: pass it as the refiner of a base model (--refiner), or use img2img")
    if pipe.concat_channels:
        raise ValueError(f"{task} cannot run a {pipe.spec.family!r} model, whose UNet also takes an image "
                         f"({pipe.concat_channels} extra channels); use inpaint or upscale")
    if not pipe.takes_text:
        raise ValueError(f"{task} needs a text-conditioned model; this is a {pipe.spec.family!r} model (try `ldm sample`)")


def is_empty_prompt(prompt: str) -> bool:
    """Whether nothing of ``prompt`` reaches the text encoder (blank, or only LoRA tags)."""
    from latent_diffusion.addons.prompt_tags import without_lora_tags

    return not without_lora_tags(prompt).strip()


def txt2img(
    pipe: Pipeline,
    prompt: str = "",
    *,
    negative_prompt: str = "",
    width: int = 512,
    height: int = 512,
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
    hires: HiresFix | None = None,
    control: Sequence[ControlUnit] | None = None,
) -> GenerationResult:
    """Generate ``batch_size * batch_count`` images of ``prompt``; image k has seed ``seed + k``.

    ``refiner`` (e.g. SDXL's) takes the latents over for the last part of the schedule. ``hires``
    enlarges the images and redraws them at the larger size (A1111's hires fix, pipelines/hires.py).
    ``control``: ControlNet units steering the (first pass's) sampling (pipelines/control.py).
    """
    check_text_model(pipe, "txt2img")
    check_units(pipe, control or [])
    control = with_defaults(control or [], None, None)
    settings = SamplingSettings.make(sampler, steps, guidance_scale, step_callback, scheduler)
    pipe.latent_shape(1, width, height)  # validates the size before any work
    if refiner is not None:
        refiner.check_fits(pipe)
    plan = plan_hires(hires, pipe, width, height, settings, prompt, negative_prompt) if hires else None
    extra = {**(plan.parameters() if plan else {}), "Clip skip": clip_skip,
             **(refiner.parameters() if refiner else {}),
             **(micro_conditioning.parameters() if micro_conditioning else {})}

    def run_batch(first_seed: int, generators: list[torch.Generator]) -> GenerationResult:
        batch = len(generators)
        cond, uncond = pipe.text_conditioning(prompt, negative_prompt, batch, clip_skip, width=width, height=height,
                                               micro=micro_conditioning)
        refine = prepare_refiner(refiner, prompt, negative_prompt, batch, width=width, height=height,
                                 micro=micro_conditioning)
        result = GenerationResult(warnings=[EMPTY_PROMPT] if is_empty_prompt(prompt) else [])
        controls = control_for_batch(pipe, control, width, height, first_seed, result)
        latents = pipe.sample_latents(settings, BatchNoise(generators), cond, uncond,
                                      shape=pipe.latent_shape(batch, width, height), refine=refine, control=controls)
        if controls is not None and plan is not None and HIRES_WITHOUT_CONTROL not in result.warnings:
            result.warnings.append(HIRES_WITHOUT_CONTROL)
        if plan is None:
            result.images = (refiner.pipe if refiner else pipe).to_images(latents, result.warnings)
        else:
            first = FirstPass(latents, first_seed, clip_skip, micro_conditioning, refiner)
            result.images = second_pass(pipe, plan, first, result.warnings)
        result.seeds = [first_seed + i for i in range(batch)]
        result.parameters = [pipe.parameters_text(prompt, negative_prompt, settings, s, width, height,
                                                  {**extra, **(controls.parameters() if controls else {})})
                             for s in result.seeds]
        return result

    return pipe.run_batches(seed, batch_size, batch_count, run_batch)
