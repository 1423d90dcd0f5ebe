"""Sigma schedules ("schedulers" in A1111 1.9+): which noise levels a run visits, chosen apart from the sampler.

The table of named schedulers; each names its plain function in :mod:`.scheduler_functions`, imported
on first use, so that listing them (``ldm samplers``) needs no PyTorch. "Automatic" has no function:
it is the sampler's own default (see :func:`latent_diffusion.diffusion.registry.sigmas_for`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

    from .schedules import NoiseSchedule

# Which published Align Your Steps table a model takes: "sd1", "sdxl", or any other family name.
ModelKind = str
SchedulerFn = Callable[..., "Tensor"]
_FUNCTIONS = "latent_diffusion.diffusion.scheduler_functions"


@dataclass(frozen=True)
class SchedulerSpec:
    """One entry of the ``--scheduler`` list (A1111's ``/sdapi/v1/schedulers`` fields)."""

    name: str  # machine name, as A1111's and ComfyUI's
    label: str  # A1111's display name, written as "Schedule type" in PNG parameters
    # The function, or its name in .scheduler_functions; None: the sampler's own default ("Automatic").
    implementation: SchedulerFn | str | None
    default_rho: float = -1.0  # A1111: -1 where the schedule has no rho
    need_inner_model: bool = False  # A1111: whether it reads the model's trained levels
    aliases: tuple[str, ...] = ()
    takes_model_kind: bool = False  # whether the function needs ``model_kind`` (per-family tables)

    @property
    def function(self) -> SchedulerFn | None:
        if isinstance(self.implementation, str):
            return getattr(importlib.import_module(_FUNCTIONS), self.implementation)
        return self.implementation

    @property
    def is_automatic(self) -> bool:
        return self.implementation is None


AUTOMATIC = SchedulerSpec("automatic", "Automatic", None)
_SPECS = (
    AUTOMATIC,
    SchedulerSpec("uniform", "Uniform", "uniform", need_inner_model=True),
    SchedulerSpec("karras", "Karras", "karras", default_rho=7.0),
    SchedulerSpec("exponential", "Exponential", "exponential"),
    SchedulerSpec("polyexponential", "Polyexponential", "polyexponential", default_rho=1.0),
    SchedulerSpec("sgm_uniform", "SGM Uniform", "sgm_uniform", need_inner_model=True, aliases=("SGMUniform",)),
    # Not one of A1111's: the timesteps distilled few-step models (SD-Turbo, SDXL-Turbo) were trained on.
    SchedulerSpec("trailing", "Trailing", "trailing", need_inner_model=True),
    SchedulerSpec("kl_optimal", "KL Optimal", "kl_optimal"),
    SchedulerSpec("align_your_steps", "Align Your Steps", "align_your_steps", aliases=("AYS",),
                  takes_model_kind=True),
    SchedulerSpec("simple", "Simple", "simple", need_inner_model=True),
    SchedulerSpec("normal", "Normal", "normal", need_inner_model=True),
    SchedulerSpec("ddim", "DDIM", "ddim_uniform", need_inner_model=True, aliases=("ddim_uniform",)),
    SchedulerSpec("beta", "Beta", "beta", need_inner_model=True),
)

SCHEDULERS: dict[str, SchedulerSpec] = {spec.name: spec for spec in _SPECS}
_LOOKUP = {key.lower(): spec for spec in _SPECS for key in (spec.name, spec.label, *spec.aliases)}


def scheduler_names() -> list[str]:
    """The ``--scheduler`` choices."""
    return list(SCHEDULERS)


def get_scheduler(name: str | SchedulerSpec | None) -> SchedulerSpec:
    """Look a scheduler up by name, A1111 label ("SGM Uniform") or alias; None and "" mean Automatic."""
    if isinstance(name, SchedulerSpec):
        return name
    if name is None or not name.strip():
        return AUTOMATIC
    spec = _LOOKUP.get(name.strip().lower())
    if spec is None:
        known = ", ".join(f"{s.name} ({s.label})" for s in _SPECS)
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {known}")
    return spec


def scheduler_sigmas(spec: SchedulerSpec, schedule: NoiseSchedule, num_steps: int,
                     model_kind: ModelKind = "sd1") -> Tensor:
    """The levels of a named (not Automatic) scheduler for a model's noise schedule."""
    if spec.is_automatic:
        raise ValueError("Automatic is the sampler's own schedule; ask the sampler registry (sigmas_for)")
    if spec.takes_model_kind:
        sigmas = spec.function(schedule, num_steps, model_kind=model_kind)
    else:
        sigmas = spec.function(schedule, num_steps)
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"the {spec.label} schedule of {num_steps} steps repeats a noise level of this model's "
                         f"{schedule.num_timesteps}-timestep training schedule; use fewer steps")
    return sigmas

