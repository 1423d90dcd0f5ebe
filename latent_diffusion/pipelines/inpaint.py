"""Inpainting: repaint the white part of a mask, with either kind of model.

A dedicated inpainting model (SD inpainting: UNet input = latent + mask + masked-image latent, 9
channels) sees the hole and its surroundings directly. An ordinary model inpaints by latent blending:
at every step the kept region is reset to the image's latent noised to the current level (CompVis'
``mask``/``x0`` sampling). ``keep_unmasked`` pastes the original pixels back outside the (blurred)
mask, so the kept region is pixel-exact, as A1111 does with its inpainting overlay.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from latent_diffusion.diffusion.denoiser import Conditioning
from latent_diffusion.diffusion.sampling import BatchNoise
from latent_diffusion.pipelines.common import GenerationResult, Pipeline, SamplingSettings, StepCallback
from latent_diffusion.pipelines.control import ControlUnit, check_units, with_defaults
from latent_diffusion.pipelines.control_images import control_for_batch
from latent_diffusion.pipelines.text_conditioning import MicroConditioning
from latent_diffusion.pipelines.images import image_to_tensor, mask_to_tensor, tensor_to_images
from latent_diffusion.pipelines.img2img import check_strength, prepare_image


def prepare_mask(mask: Image.Image | None, size: tuple[int, int], *, blur: float, padding: int) -> torch.Tensor:
    """Mask [1, 1, H, W] in [0, 1] (1 = repaint), grown by ``padding`` pixels, then Gaussian-blurred."""
    if mask is None:
        raise ValueError("inpainting needs a mask image (white = repaint)")
    if not isinstance(mask, Image.Image):
        raise ValueError(f"mask must be a PIL image, got {type(mask).__name__}")
    if blur < 0 or padding < 0:
        raise ValueError(f"mask blur and padding must be >= 0, got {blur} and {padding}")
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        # Strokes painted on a transparent layer mark the hole by their opacity, not their colour (A1111).
        mask = mask.getchannel("A")
    grey = mask.convert("L")
    if padding:
        grey = grey.filter(ImageFilter.MaxFilter(2 * padding + 1))
    return mask_to_tensor(grey, size, blur=blur)


def inpaint(
    pipe: Pipeline,
    prompt: str = "",
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    *,
    negative_prompt: str = "",
    mask_blur: float = 0.0,
    mask_padding: int = 0,
    keep_unmasked: bool = False,
    strength: float = 1.0,
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
    control: Sequence[ControlUnit] | None = None,
) -> GenerationResult:
    """Repaint the masked part of ``image`` (mask and image must have the same size); ``control``:
    ControlNet units (without an image: ``image`` and ``mask``, as in A1111)."""
    if not pipe.takes_text:
        raise ValueError(f"inpaint needs a text-conditioned model; this is a {pipe.spec.family!r} model")
    dedicated = pipe.concat_channels == pipe.spec.latent_channels + 1
    if pipe.concat_channels and not dedicated:
        raise ValueError(f"a {pipe.spec.family!r} model cannot inpaint (its UNet takes {pipe.concat_channels} "
                         f"image channels, an inpainting model takes {pipe.spec.latent_channels + 1})")
    settings = SamplingSettings.make(sampler, steps, guidance_scale, step_callback, scheduler)
    strength = check_strength(strength)
    image = prepare_image(image, None, None, max(8, pipe.latent_factor))
    soft_mask = prepare_mask(mask, image.size, blur=mask_blur, padding=mask_padding)
    check_units(pipe, control or [])
    control = with_defaults(control or [], image, mask)
    pixels = image_to_tensor(image)
    f = pipe.latent_factor
    latent_size = (image.height // f, image.width // f)
    extra = {"Denoising strength": f"{strength:g}" if strength != 1 else None,
             "Mask blur": f"{mask_blur:g}" if mask_blur else None, "Mask padding": mask_padding or None,
             "Clip skip": clip_skip}

    def run_batch(first_seed: int, generators: list[torch.Generator]) -> GenerationResult:
        batch = len(generators)
        cond, uncond = pipe.text_conditioning(prompt, negative_prompt, batch, clip_skip, width=image.width, height=image.height,
                                               micro=micro_conditioning)
        shape = (batch, pipe.spec.latent_channels, *latent_size)
        result = GenerationResult()
        controls = control_for_batch(pipe, control, image.width, image.height, first_seed, result)
        if dedicated:
            # The model was trained on a binary mask and the image with the hole set to 0 (grey).
            hard = (soft_mask >= 0.5).to(pixels.dtype)
            masked = pipe.encode_images((pixels * (1 - hard)).expand(batch, -1, -1, -1), generators)
            concat = torch.cat([F.interpolate(hard, size=latent_size).to(masked).expand(batch, -1, -1, -1), masked], 1)
            cond = dataclasses.replace(cond, concat=concat)
            init = pipe.encode_images(pixels.expand(batch, -1, -1, -1), generators) if strength < 1 else None
            latents = pipe.sample_latents(settings, BatchNoise(generators), cond, uncond, shape=shape,
                                          init_latent=init, strength=strength, control=controls)
        else:
            init = pipe.encode_images(pixels.expand(batch, -1, -1, -1), generators)
            # A1111 rounds the downsampled mask: a latent pixel is either kept or repainted.
            keep = 1 - F.interpolate(soft_mask, size=latent_size, mode="area").round()
            latents = pipe.sample_latents(settings, BatchNoise(generators), cond, uncond, init_latent=init,
                                          strength=strength, keep_mask=keep.to(init), control=controls)
        decoded = pipe.decode(latents, result.warnings)
        if keep_unmasked:
            decoded = pixels * (1 - soft_mask) + decoded.clamp(-1, 1) * soft_mask
        result.images = tensor_to_images(decoded)
        result.seeds = [first_seed + i for i in range(batch)]
        result.parameters = [pipe.parameters_text(prompt, negative_prompt, settings, s, image.width, image.height,
                                                  {**extra, **(controls.parameters() if controls else {})})
                             for s in result.seeds]
        return result

    return pipe.run_batches(seed, batch_size, batch_count, run_batch)
