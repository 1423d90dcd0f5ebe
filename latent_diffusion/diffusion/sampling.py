"""Running a sampler for a batch: seeded noise, txt2img / img2img starts, inpainting by latent blending."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor

from .denoiser import Conditioning
from .registry import SamplerSpec, resolve_sampler
from .samplers import Callback, DenoiserFn, NoiseSource
from .schedules import NoiseSchedule, img2img_sigmas, scale_to_vp


def make_generators(seed: int, batch_size: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded ``seed + index``: image i is the same alone or in a batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(batch_size)]


class BatchNoise:
    """Standard normal noise whose row i comes from generator i (initial and ancestral noise alike).

    Rows are drawn on the generators' device and then moved, so a CPU seed gives the same image on
    any device; diffusers' ``randn_tensor`` with a list of generators draws the same numbers.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if not generators:
            raise ValueError("BatchNoise needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def from_seed(cls, seed: int, batch_size: int, device: str | torch.device = "cpu") -> BatchNoise:
        return cls(make_generators(seed, batch_size, device))

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} requested from {len(self.generators)} generators")
        rows = [
            torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device) for g in self.generators
        ]
        return torch.cat(rows).to(device)

    def __call__(self, like: Tensor) -> Tensor:
        return self.randn(like.shape, dtype=like.dtype, device=like.device)


class InpaintingDenoiser:
    """Inpainting by latent blending, for any model and sampler (as CompVis' ``mask``/``x0`` sampling).

    Before each evaluation the known region (``keep_mask == 1``) of the input is replaced by the known
    latent noised to the current level, and the estimate there by the known latent itself, so the
    sampler's state in that region stays on the known latent's noising path.
    """

    def __init__(self, denoiser: DenoiserFn, known: Tensor, keep_mask: Tensor, noise: NoiseSource) -> None:
        if keep_mask.ndim != known.ndim or keep_mask.shape[2:] != known.shape[2:]:
            raise ValueError(
                f"keep_mask of shape {tuple(keep_mask.shape)} must be [B or 1, 1 or C, H, W] of the latent "
                f"{tuple(known.shape)}"
            )
        self.denoiser = denoiser
        self.known = known
        self.keep_mask = keep_mask.to(known.dtype)
        self.noise = noise

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        level = sigma.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        noised_known = self.known + self.noise(x) * level
        x = self.keep_mask * noised_known + (1 - self.keep_mask) * x
        denoised = self.denoiser(x, sigma, cond)
        return self.keep_mask * self.known + (1 - self.keep_mask) * denoised


def sample(
    sampler: SamplerSpec | str,
    denoiser: DenoiserFn,
    sigmas: Tensor,
    noise: BatchNoise | NoiseSource,
    *,
    shape: Sequence[int] | None = None,
    cond: Conditioning | None = None,
    init_latent: Tensor | None = None,
    strength: float = 1.0,
    keep_mask: Tensor | None = None,
    callback: Callback | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    schedule: NoiseSchedule | None = None,
    **options,
) -> Tensor:
    """Generate latents: txt2img, img2img (``init_latent``, ``strength``), inpainting (``keep_mask``).

    ``noise`` draws all randomness (initial, ancestral, re-noising): a :class:`BatchNoise` for seeded
    per-image noise, or any function returning standard normal noise shaped like its argument.
    ``schedule`` is the model's noise schedule, for samplers that need its timesteps (LCM).

    txt2img starts from ``noise * sqrt(1 + sigma_max^2)``, the unit-variance latent that DDPM/DDIM
    start from, seen in the sigma frame. img2img runs the last ``int(n * strength)`` steps from
    ``init_latent + sigma * noise`` (diffusers' and CompVis' img2img). A sequence that ends above 0
    (CompVis DDIM) is returned at that level in the network's frame, as the references return it.
    """
    # A name's scheduler part ("DPM++ 2M Karras") chose ``sigmas`` already; the sampler is what runs.
    spec = resolve_sampler(sampler)[0] if isinstance(sampler, str) else sampler
    if keep_mask is not None and init_latent is None:
        raise ValueError("inpainting (keep_mask) needs init_latent, the latent of the image to keep")
    if init_latent is None:
        if shape is None:
            raise ValueError("txt2img needs the latent shape")
        x = noise(torch.zeros(shape, dtype=dtype, device=device)) * (1 + float(sigmas[0]) ** 2) ** 0.5
    else:
        sigmas = img2img_sigmas(sigmas, strength)
        if len(sigmas) == 1:  # strength too low for a single step: nothing to change
            return init_latent
        x = init_latent + noise(init_latent) * float(sigmas[0])
        if keep_mask is not None:
            denoiser = InpaintingDenoiser(denoiser, init_latent, keep_mask, noise)
    if len(sigmas) > 1:
        accepted = inspect.signature(spec.function).parameters
        kwargs = {**spec.options, **options}
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"sampler {spec.name!r} has no option(s) {unknown}")
        if "noise" in accepted:
            kwargs["noise"] = noise
        if "schedule" in accepted and schedule is not None:
            kwargs["schedule"] = schedule
        x = spec.function(denoiser, x, sigmas, cond=cond, callback=callback, **kwargs)
    if float(sigmas[-1]) > 0:
        x = scale_to_vp(x, float(sigmas[-1]))
    if keep_mask is not None:
        x = keep_mask * init_latent + (1 - keep_mask) * x
    return x
