"""Sampling from a model under training (EMA weights, DDIM, classifier-free guidance) for grids and tests."""
from __future__ import annotations

import torch

from latent_diffusion.diffusion.denoiser import Conditioning, Denoiser
from latent_diffusion.diffusion.guidance import ClassifierFreeGuidance
from latent_diffusion.diffusion.registry import resolve_sampler, sigmas_for
from latent_diffusion.diffusion.sampling import BatchNoise, sample
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.training.ldm_model import make_tokenizer, random_masks, concat_condition
from latent_diffusion.training.latents import encode_latents


@torch.no_grad()
def generate(model, network, ema, spec, scale_factor, settings, *, captions, labels, images=None, seed=0,
             steps: int | None = None, guidance_scale: float | None = None, sampler: str = "ddim") -> torch.Tensor:
    """Decoded samples in [-1, 1] for the given captions / labels / conditioning images, with EMA weights."""
    saved = {k: v.detach().clone() for k, v in network.state_dict().items()}
    if ema is not None:
        ema.copy_to(network)
    network.eval()
    try:
        device = next(network.parameters()).device
        count = len(captions)
        tokenizer = make_tokenizer(spec)
        encoder = model.cond_stage_model

        def context_for(cond_captions, cond_labels):
            if tokenizer is not None:
                return encoder(tokenizer(cond_captions).to(device))
            if settings.task == "class":
                return encoder(cond_labels.to(device))
            return None

        context = context_for(list(captions), labels)
        uncond_context = context_for([""] * count, torch.full((count,), settings.conditioner.n_classes))
        factor = spec.downsampling_factor
        size = settings_size(images, model, settings, factor)
        concat = None
        if images is not None and settings.task in ("superres", "inpainting"):
            images = images[:count].to(device)
            masks = random_masks([torch.Generator().manual_seed(seed + i) for i in range(count)], images.shape[-1]).to(device)
            concat = concat_condition(settings.task, images, masks, (size, size),
                                      lambda x: encode_latents(model.first_stage_model, x, None) * scale_factor)
        schedule = NoiseSchedule.from_config(spec.schedule)
        denoiser = Denoiser(lambda x, t, context=None, y=None: network.unet(x, t, context=context), schedule, spec.prediction)
        scale = settings.guidance_scale if guidance_scale is None else guidance_scale
        cond = Conditioning(context=context, concat=concat)
        if context is not None and scale != 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, Conditioning(context=uncond_context, concat=concat), scale)
        spec_sampler, scheduler = resolve_sampler(sampler)
        sigmas = sigmas_for(spec_sampler, schedule, steps or settings.sample_steps, scheduler=scheduler)
        latents = sample(spec_sampler, denoiser, sigmas, BatchNoise.from_seed(seed, count),
                         shape=(count, spec.latent_channels, size, size), cond=cond, device=device)
        return model.first_stage_model.decode(latents / scale_factor).clamp(-1, 1)
    finally:
        network.load_state_dict(saved)
        network.train()


def settings_size(images, model, settings, factor: int) -> int:
    """Latent side length: from the conditioning images when given, else from the autoencoder's training resolution."""
    if images is not None:
        return images.shape[-1] // factor
    return model.first_stage_model.config.resolution // factor
