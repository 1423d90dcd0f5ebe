"""Super-resolution with latent diffusion: the SD 2 x4 upscaler and the LDM paper's SR model.

Both concatenate the low-resolution image (in [-1, 1], at the latent's size) to the latent. The x4
upscaler first noises it to ``noise_level`` on its augmentation schedule and tells the UNet that
level as a class label (Ho et al. 2021, noise conditioning augmentation); it is text-guided. The LDM
SR model takes the image as it is and no text. Large inputs are processed in overlapping tiles whose
outputs are blended with linear ramps, so memory stays bounded.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from PIL import Image

from latent_diffusion.diffusion.denoiser import Conditioning
from latent_diffusion.diffusion.sampling import BatchNoise, make_generators
from latent_diffusion.diffusion.schedules import alphas_cumprod_for
from latent_diffusion.pipelines.common import GenerationResult, Pipeline, SamplingSettings, StepCallback
from latent_diffusion.pipelines.images import image_to_tensor, tensor_to_images, to_rgb


def is_upscaler(pipe: Pipeline) -> bool:
    return pipe.family.is_upscaler(pipe.spec)


def input_multiple(pipe: Pipeline) -> int:
    """What the sides of an input (or tile) must be a multiple of: the UNet halves the latent
    (len(channel_mult) - 1) times, and the latent has the input's size."""
    return 2 ** (len(pipe.spec.unet.channel_mult) - 1)


def augment(pixels: Tensor, noise_level: int, pipe: Pipeline, generators) -> Tensor:
    """The low-res image noised to ``noise_level`` on the augmentation schedule (DDPM forward process)."""
    alpha_bar = alphas_cumprod_for(pipe.spec.noise_augmentation)[noise_level].item()
    # Drawn on each generator's device (CPU seeds give the same image everywhere), then moved.
    noise = torch.cat([torch.randn((1, *pixels.shape[1:]), generator=g, device=g.device) for g in generators])
    noise = noise.to(pixels.device, pixels.dtype)
    return alpha_bar**0.5 * pixels + (1 - alpha_bar) ** 0.5 * noise


def _tiles(length: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Start offsets of tiles covering ``length`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, multiple)
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(s - s % multiple for s in starts[:-1]) | {starts[-1]})


def _ramp(size: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """Blend weights along one axis: linear over the overlap, except at the image border."""
    weights = torch.ones(size)
    if overlap > 0:
        ramp = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not at_start:
            weights[:overlap] = ramp
        if not at_end:
            weights[-overlap:] = ramp.flip(0)
    return weights


def _check_inputs(pipe: Pipeline, image: Image.Image | None, noise_level: int, tile_size: int | None,
                  tile_overlap: int) -> tuple[Image.Image, int]:
    """The input image in RGB and the multiple its sides (and tiles) must have; ValueError otherwise."""
    if not is_upscaler(pipe):
        raise ValueError(f"upscale needs a super-resolution model (SD x4 upscaler or LDM SR); this is a "
                         f"{pipe.spec.family!r} model")
    if image is None or not isinstance(image, Image.Image):
        raise ValueError("upscale needs an input image")
    if pipe.spec.noise_augmentation is not None and not 0 <= noise_level <= (pipe.spec.max_noise_level or 350):
        raise ValueError(f"noise level must be in [0, {pipe.spec.max_noise_level or 350}], got {noise_level}")
    multiple = input_multiple(pipe)
    image = to_rgb(image, what="input image")
    if image.width % multiple or image.height % multiple:
        raise ValueError(f"input image size {image.width}x{image.height} must be a multiple of {multiple} "
                         "for this model")
    if tile_size is not None and (tile_size < 2 * multiple or tile_size % multiple or tile_overlap < 0
                                  or tile_overlap >= tile_size):
        raise ValueError(f"tile size must be a multiple of {multiple} (at least {2 * multiple}) larger than "
                         f"the overlap; got {tile_size} and overlap {tile_overlap}")
    return image, multiple


def _in_tiles(pixels: Tensor, tile: int, overlap: int, multiple: int, factor: int,
              upscale_part: Callable[[Tensor], Tensor]) -> Tensor:
    """``upscale_part`` of every overlapping tile of ``pixels``, blended with linear ramps."""
    height, width = pixels.shape[2:]
    ys, xs = _tiles(height, tile, overlap, multiple), _tiles(width, tile, overlap, multiple)
    if len(ys) * len(xs) == 1:
        return upscale_part(pixels)
    output, total = None, torch.zeros(1, 1, height * factor, width * factor)
    for y in ys:
        for x in xs:
            h, w = min(tile, height), min(tile, width)
            part = upscale_part(pixels[:, :, y:y + h, x:x + w]).cpu()
            if output is None:
                output = torch.zeros(part.shape[0], 3, height * factor, width * factor)
            weight = (_ramp(h * factor, overlap * factor, y == 0, y + h == height)[:, None]
                      * _ramp(w * factor, overlap * factor, x == 0, x + w == width)[None, :])
            output[:, :, y * factor:(y + h) * factor, x * factor:(x + w) * factor] += part * weight
            total[:, :, y * factor:(y + h) * factor, x * factor:(x + w) * factor] += weight
    return output / total


def upscale(
    pipe: Pipeline,
    image: Image.Image | None = None,
    prompt: str = "",
    *,
    negative_prompt: str = "",
    noise_level: int = 20,
    steps: int | None = None,
    sampler: str = "euler_a",
    scheduler: str | None = None,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    batch_size: int = 1,
    batch_count: int = 1,
    tile_size: int | None = None,
    tile_overlap: int = 16,
    clip_skip: int | None = None,
    step_callback: StepCallback | None = None,
) -> GenerationResult:
    """Upscale ``image`` by the model's factor; ``tile_size`` (low-res pixels) splits large inputs."""
    image, multiple = _check_inputs(pipe, image, noise_level, tile_size, tile_overlap)
    text = pipe.takes_text
    # Without a prompt there is nothing to guide by: the model runs unguided, and its PNGs say so.
    settings = SamplingSettings.make(sampler, steps, guidance_scale if text else 1.0, step_callback, scheduler)
    augmented = pipe.spec.noise_augmentation is not None
    f = pipe.latent_factor
    width, height = image.size
    pixels = image_to_tensor(image)
    extra = {"Noise level": noise_level if augmented else None, "Upscale": f,
             "Tile size": tile_size, "Clip skip": clip_skip}

    def upscale_tile(tile: Tensor, batch: int, generators, cond: Conditioning, uncond: Conditioning | None) -> Tensor:
        low = tile.expand(batch, -1, -1, -1).to(pipe.device, pipe.dtype)
        if augmented:
            low = augment(low, noise_level, pipe, generators).to(pipe.dtype)
            levels = torch.full((batch,), noise_level, dtype=torch.long, device=pipe.device)
            cond = Conditioning(context=cond.context, y=levels, concat=low)
            uncond = Conditioning(context=uncond.context, y=levels) if uncond is not None else None
        else:
            cond = Conditioning(context=cond.context, concat=low)
        shape = (batch, pipe.spec.latent_channels, *tile.shape[2:])
        latents = pipe.sample_latents(settings, BatchNoise(generators), cond, uncond, shape=shape)
        return pipe.decode(latents, warnings)

    warnings: list[str] = []

    def run_batch(first_seed: int, generators: list[torch.Generator]) -> GenerationResult:
        batch = len(generators)
        if text:
            cond, uncond = pipe.text_conditioning(prompt, negative_prompt, batch, clip_skip,
                                                  width=width * f, height=height * f)
        else:
            cond, uncond = Conditioning(), None
        # Every tile starts from the same seeds, so a tile's content does not depend on its position.
        output = _in_tiles(pixels, tile_size or max(width, height), tile_overlap, multiple, f,
                           lambda part: upscale_tile(part, batch, make_generators(first_seed, batch), cond, uncond))
        result = GenerationResult(warnings=list(warnings))
        result.images = tensor_to_images(output)
        result.seeds = [first_seed + i for i in range(batch)]
        result.parameters = [pipe.parameters_text(prompt, negative_prompt, settings, s, width * f, height * f, extra)
                             for s in result.seeds]
        return result

    return pipe.run_batches(seed, batch_size, batch_count, run_batch)
