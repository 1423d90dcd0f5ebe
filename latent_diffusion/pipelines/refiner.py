"""A second model that finishes the first one's image: SDXL's refiner, as A1111 and diffusers run it.

The base model denoises from pure noise until the noise level reaches the switch point; the refiner
takes the same latents from there to the end, under its own conditioning (for the SDXL refiner: its
own text encoder and the aesthetic score). The switch is by noise level, as A1111's "switch at" and
diffusers' ``denoising_end`` / ``denoising_start`` both place it: the refiner takes every step whose
(nearest trained) timestep t has ``(T - 1 - t) / T >= switch_at``. One sampler run spans both, so a
sampler with history keeps it across the switch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latent_diffusion.diffusion.denoiser import Conditioning
from latent_diffusion.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:
    from latent_diffusion.pipelines.common import Pipeline

DEFAULT_SWITCH_AT = 0.8


@dataclass(frozen=True)
class Refiner:
    """The model that takes over at ``switch_at`` (a fraction of the noise schedule, in (0, 1))."""

    pipe: Pipeline
    switch_at: float = DEFAULT_SWITCH_AT

    def __post_init__(self) -> None:
        if not 0.0 < self.switch_at < 1.0:
            raise ValueError(f"refiner switch point must lie strictly between 0 and 1, got {self.switch_at}")
        if not self.pipe.takes_text or self.pipe.concat_channels:
            raise ValueError(f"a refiner must be a text-to-image model; {self.pipe.name!r} is a "
                             f"{self.pipe.spec.family!r} model")

    def check_fits(self, base: Pipeline) -> None:
        """A refiner continues the base model's latents, so both must share one latent space."""
        same = (base.spec.autoencoder == self.pipe.spec.autoencoder and base.spec.scale_factor == self.pipe.spec.scale_factor
                and base.spec.latent_channels == self.pipe.spec.latent_channels)
        if not same:
            raise ValueError(
                f"refiner {self.pipe.name!r} ({self.pipe.spec.family}) cannot continue the latents of "
                f"{base.name!r} ({base.spec.family}): their autoencoders or latent scales differ "
                f"({self.pipe.spec.scale_factor:g} vs {base.spec.scale_factor:g}); use a refiner of the same family"
            )

    def parameters(self) -> dict[str, str]:
        """The A1111 ``parameters`` entries of a refined image."""
        name = f"{self.pipe.name} [{self.pipe.hash[:10]}]" if self.pipe.hash else self.pipe.name
        return {"Refiner": name, "Refiner switch at": f"{self.switch_at:g}"}


@dataclass(frozen=True)
class RefinerRun:
    """A refiner with its conditioning for one batch."""

    refiner: Refiner
    cond: Conditioning
    uncond: Conditioning


def prepare_refiner(refiner: Refiner | None, prompt: str, negative_prompt: str, batch_size: int, *,
                    width: int, height: int, micro=None) -> RefinerRun | None:
    """The refiner's conditioning for a batch (None without a refiner)."""
    if refiner is None:
        return None
    from latent_diffusion.addons.prompt_tags import without_lora_tags

    # The LoRAs a prompt names are for the base model (a refiner's layers differ); embeddings apply to both.
    cond, uncond = refiner.pipe.text_conditioning(without_lora_tags(prompt), without_lora_tags(negative_prompt),
                                                  batch_size, None, width=width, height=height, micro=micro)
    return RefinerRun(refiner, cond, uncond)


def refiner_takes_over(sigma: Tensor, schedule: NoiseSchedule, switch_at: float) -> bool:
    """Whether the refiner denoises at noise level ``sigma``."""
    timestep = schedule.timestep_at(sigma.detach().float().max().cpu(), quantize=True).item()
    last = schedule.num_timesteps - 1
    return (last - timestep) / schedule.num_timesteps >= switch_at


class HandOff:
    """A denoiser that is the base model's above the switch point and the refiner's from there on.

    The sampler passes the base model's conditioning; the refiner's is bound here.
    """

    def __init__(self, base, refiner, refiner_cond: Conditioning, schedule: NoiseSchedule, switch_at: float) -> None:
        self.base, self.refiner, self.refiner_cond = base, refiner, refiner_cond
        self.schedule, self.switch_at = schedule, switch_at
        self.switched = False

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        if refiner_takes_over(torch.as_tensor(sigma), self.schedule, self.switch_at):
            self.switched = True
            return self.refiner(x, sigma, self.refiner_cond)
        return self.base(x, sigma, cond)
