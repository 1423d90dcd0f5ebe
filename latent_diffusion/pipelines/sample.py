"""Class-conditional and unconditional sampling (the latent-diffusion paper's ImageNet / LSUN models).

A class reaches the UNet as a one-token cross-attention context (CompVis ``ClassEmbedder``) or, for
a UNet with a class embedding and no condition encoder, as its label input ``y``. Guidance needs an
unconditional class: models trained with condition dropout reserve the last id for "no class"
(CompVis cin256-v2 and this package's trainer both do), and that id is used as the negative.
"""
from __future__ import annotations

from typing import Sequence

import torch

from latent_diffusion.diffusion.denoiser import Conditioning
from latent_diffusion.diffusion.sampling import BatchNoise
from latent_diffusion.pipelines.common import GenerationResult, Pipeline, SamplingSettings, StepCallback


def class_count(pipe: Pipeline) -> int | None:
    """Number of class ids the model accepts (None: unconditional)."""
    if pipe.takes_class:
        return pipe.spec.conditioner.n_classes
    if pipe.spec.conditioner is None and pipe.spec.unet.num_classes is not None and not pipe.concat_channels:
        return pipe.spec.unet.num_classes
    return None


def _what_to_run_instead(pipe: Pipeline) -> str:
    if pipe.family.is_upscaler(pipe.spec):
        return f"the model {pipe.name!r} enlarges images: run `ldm upscale -i IMAGE`"
    if pipe.concat_channels:
        return f"the model {pipe.name!r} repaints images: run `ldm inpaint -i IMAGE -m MASK`"
    return f"the model {pipe.name!r} draws from a text prompt: run `ldm txt2img \"PROMPT\"`"


def _class_conditioning(pipe: Pipeline, ids: torch.Tensor) -> Conditioning:
    if pipe.takes_class:
        with torch.no_grad():
            return Conditioning(context=pipe.model.condition_encoder(ids.to(pipe.device)).to(pipe.dtype))
    return Conditioning(y=ids.to(pipe.device))


def sample_classes(
    pipe: Pipeline,
    *,
    class_ids: Sequence[int] | None = None,
    width: int = 256,
    height: int = 256,
    steps: int | None = None,
    sampler: str = "euler_a",
    scheduler: str | None = None,
    guidance_scale: float = 1.0,
    seed: int | None = None,
    batch_size: int = 1,
    batch_count: int = 1,
    step_callback: StepCallback | None = None,
) -> GenerationResult:
    """Images of the given classes (cycled over the images) or, for unconditional models, of nothing."""
    if pipe.takes_text or pipe.concat_channels:
        raise ValueError(f"`sample` is for class-conditional and unconditional models (images of a class, or of "
                         f"nothing); {_what_to_run_instead(pipe)}")
    settings = SamplingSettings.make(sampler, steps, guidance_scale, step_callback, scheduler)
    pipe.latent_shape(1, width, height)
    n_classes = class_count(pipe)
    ids = list(class_ids or [])
    if n_classes is None and ids:
        raise ValueError("this model is unconditional; it takes no class ids")
    if n_classes is not None:
        if not ids:
            raise ValueError(f"this model is class-conditional; give one or more class ids in [0, {n_classes})")
        bad = [i for i in ids if not 0 <= i < n_classes]
        if bad:
            raise ValueError(f"class ids {bad} are out of range [0, {n_classes})")
    guided = n_classes is not None and settings.guidance_scale != 1.0
    counter = {"next": 0}

    def run_batch(first_seed: int, generators: list[torch.Generator]) -> GenerationResult:
        batch = len(generators)
        if n_classes is None:
            batch_ids, cond, uncond = [None] * batch, Conditioning(), None
        else:
            batch_ids = [ids[(counter["next"] + i) % len(ids)] for i in range(batch)]
            cond = _class_conditioning(pipe, torch.tensor(batch_ids))
            uncond = _class_conditioning(pipe, torch.full((batch,), n_classes - 1)) if guided else None
        counter["next"] += batch
        latents = pipe.sample_latents(settings, BatchNoise(generators), cond, uncond,
                                      shape=pipe.latent_shape(batch, width, height))
        result = GenerationResult()
        result.images = pipe.to_images(latents, result.warnings)
        result.seeds = [first_seed + i for i in range(batch)]
        result.parameters = [
            pipe.parameters_text("", "", settings, s, width, height, {"Class": c}) for s, c in zip(result.seeds, batch_ids)
        ]
        return result

    return pipe.run_batches(seed, batch_size, batch_count, run_batch)
