"""The samplers under the names users know from A1111 and ComfyUI, each with its own default step selection.

A sampler and its sigma schedule (:mod:`.schedulers`) are chosen apart. The combined names of older
A1111 versions ("DPM++ 2M Karras", ``dpmpp_2m_karras``), and any sampler name followed by a
scheduler name, choose both at once.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .schedulers import SCHEDULERS, ModelKind, SchedulerSpec, get_scheduler, scheduler_sigmas

if TYPE_CHECKING:
    from torch import Tensor

    from .schedules import FinalSigma, NoiseSchedule, Spacing

_FUNCTIONS = "latent_diffusion.diffusion.samplers"


@dataclass(frozen=True)
class SamplerSpec:
    """One entry of the ``--sampler`` list: a sampler function and how it is run by default.

    ``spacing``, ``final`` and ``default_steps`` are the sampler's own schedule, which the
    "Automatic" scheduler runs.
    """

    name: str  # command-line name, ComfyUI's spelling where it has one
    label: str  # A1111's display name
    # The function, or its name in .samplers (imported on first use: listing needs no PyTorch).
    implementation: Callable[..., Tensor] | str
    spacing: Spacing = "linspace"  # k-diffusion's default (A1111's "Uniform")
    final: FinalSigma = "zero"
    default_steps: int = 20
    options: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def function(self) -> Callable[..., Tensor]:
        if isinstance(self.implementation, str):
            return getattr(importlib.import_module(_FUNCTIONS), self.implementation)
        return self.implementation


_SPECS = (
    SamplerSpec("euler", "Euler", "sample_euler"),
    SamplerSpec("euler_ancestral", "Euler a", "sample_euler_ancestral", stochastic=True, aliases=("euler_a",)),
    SamplerSpec("heun", "Heun", "sample_heun"),
    SamplerSpec("lms", "LMS", "sample_lms"),
    SamplerSpec("dpmpp_2s_ancestral", "DPM++ 2S a", "sample_dpmpp_2s_ancestral", stochastic=True),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", "sample_dpmpp_2m"),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", "sample_dpmpp_2m_sde", stochastic=True),
    SamplerSpec("uni_pc", "UniPC", "sample_unipc", aliases=("unipc",)),
    # CompVis' DDIM and PLMS: "uniform" steps, ending at the smallest trained level, 50 steps. DDIM
    # with eta 0 adds no noise after the starting noise: deterministic.
    SamplerSpec(
        "ddim", "DDIM", "sample_ddim", spacing="uniform", final="sigma_min", default_steps=50,
        options={"eta": 0.0},
    ),
    SamplerSpec("plms", "PLMS", "sample_plms", spacing="uniform", final="sigma_min", default_steps=50),
    SamplerSpec("ddpm", "DDPM", "sample_ddpm", spacing="uniform", default_steps=100, stochastic=True),
    # Latent consistency models (LCM checkpoints, or any model with an LCM-LoRA): a few steps at
    # guidance 1-2, on the timesteps they were distilled on.
    SamplerSpec("lcm", "LCM", "sample_lcm", spacing="lcm", default_steps=4, stochastic=True),
    # Trajectory consistency distillation (TCD checkpoints and LoRAs): LCM's timesteps, a partial
    # re-noising each step (gamma, diffusers' eta), ending at the smallest trained level.
    SamplerSpec("tcd", "TCD", "sample_tcd", spacing="lcm", final="sigma_min", default_steps=4,
                options={"gamma": 0.3}, stochastic=True),
)

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
_LOOKUP = {key.lower(): spec for spec in _SPECS for key in (spec.name, spec.label, *spec.aliases)}


def sampler_names() -> list[str]:
    """The ``--sampler`` choices."""
    return list(SAMPLERS)


def _unknown_sampler(name: str) -> ValueError:
    return ValueError(f"unknown sampler {name!r}; choose one of {sampler_names()} (a name may end in a "
                      f"scheduler, as in 'DPM++ 2M Karras' or dpmpp_2m_karras; see `ldm samplers`)")


def _split_combined(name: str) -> tuple[SamplerSpec, SchedulerSpec] | None:
    """(sampler, scheduler) of "<sampler> <scheduler>" or "<sampler>_<scheduler>" in any spelling of each."""
    key = name.strip().lower()
    for scheduler in SCHEDULERS.values():
        for spelling in (scheduler.name, scheduler.label, *scheduler.aliases):
            for separator in (" ", "_"):
                suffix = separator + spelling.lower()
                if key.endswith(suffix) and (sampler := _LOOKUP.get(key[: -len(suffix)])) is not None:
                    return sampler, scheduler
    return None


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by its name, A1111 label ("DPM++ 2M") or alias, ignoring case.

    A combined name ("DPM++ 2M Karras") is refused here, where its scheduler would be lost; use
    :func:`resolve_sampler` for those.
    """
    spec = _LOOKUP.get(name.strip().lower())
    if spec is not None:
        return spec
    combined = _split_combined(name)
    if combined is not None:
        sampler, scheduler = combined
        raise ValueError(f"{name!r} is the sampler {sampler.label!r} with the scheduler {scheduler.label!r}; "
                         "name the sampler alone here")
    raise _unknown_sampler(name)


def resolve_sampler(name: str, scheduler: str | SchedulerSpec | None = None) -> tuple[SamplerSpec, SchedulerSpec]:
    """The sampler and scheduler a user asked for: ``name`` may carry a scheduler ("DPM++ 2M Karras").

    ``scheduler`` None, "" or Automatic leaves the choice to the name (the sampler's own schedule
    when it carries none); a scheduler that contradicts the one in the name is an error.
    """
    chosen = get_scheduler(scheduler)
    spec = _LOOKUP.get(name.strip().lower())
    if spec is not None:
        return spec, chosen
    combined = _split_combined(name)
    if combined is None:
        raise _unknown_sampler(name)
    spec, carried = combined
    if not chosen.is_automatic and chosen is not carried:
        raise ValueError(f"sampler {name!r} already chooses the {carried.label} scheduler, but the scheduler "
                         f"{chosen.label!r} was asked for; give the sampler as {spec.label!r}")
    return spec, carried


def sigmas_for(
    spec: SamplerSpec,
    schedule: NoiseSchedule,
    num_steps: int | None = None,
    *,
    scheduler: str | SchedulerSpec | None = None,
    spacing: Spacing | None = None,
    steps_offset: int = 0,
    model_kind: ModelKind = "sd1",
) -> Tensor:
    """The sigma sequence a sampler runs: its own by default ("Automatic"), or a named scheduler's.

    ``spacing`` and ``steps_offset`` override the sampler's own schedule; ``model_kind`` picks the
    per-family table of schedulers that have one (Align Your Steps).
    """
    from .schedules import make_sigmas

    chosen = get_scheduler(scheduler)
    num_steps = num_steps or spec.default_steps
    if not chosen.is_automatic:
        if spacing is not None or steps_offset:
            raise ValueError(f"spacing and steps_offset apply to the sampler's own schedule, not to {chosen.label}")
        return scheduler_sigmas(chosen, schedule, num_steps, model_kind)
    return make_sigmas(schedule, num_steps, spacing or spec.spacing, steps_offset=steps_offset, final=spec.final)
