"""The samplers under the names users know from A1111 and ComfyUI, with their default step selection."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from . import samplers as s
from .schedules import FinalSigma, NoiseSchedule, Spacing, make_sigmas


@dataclass(frozen=True)
class SamplerSpec:
    """One entry of the ``--sampler`` list: a sampler function and how it is run by default."""

    name: str  # command-line name, ComfyUI's spelling where it has one
    label: str  # A1111's display name
    function: Callable[..., Tensor]
    spacing: Spacing = "linspace"  # k-diffusion's default ("normal" in ComfyUI)
    final: FinalSigma = "zero"
    default_steps: int = 20
    options: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    aliases: tuple[str, ...] = ()


_SPECS = (
    SamplerSpec("euler", "Euler", s.sample_euler),
    SamplerSpec("euler_ancestral", "Euler a", s.sample_euler_ancestral, stochastic=True, aliases=("euler_a",)),
    SamplerSpec("heun", "Heun", s.sample_heun),
    SamplerSpec("lms", "LMS", s.sample_lms),
    SamplerSpec("lms_karras", "LMS Karras", s.sample_lms, spacing="karras"),
    SamplerSpec("dpmpp_2s_ancestral", "DPM++ 2S a", s.sample_dpmpp_2s_ancestral, stochastic=True),
    SamplerSpec(
        "dpmpp_2s_ancestral_karras", "DPM++ 2S a Karras", s.sample_dpmpp_2s_ancestral, spacing="karras",
        stochastic=True,
    ),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", s.sample_dpmpp_2m),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M Karras", s.sample_dpmpp_2m, spacing="karras"),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", s.sample_dpmpp_2m_sde, stochastic=True),
    SamplerSpec(
        "dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras", s.sample_dpmpp_2m_sde, spacing="karras", stochastic=True
    ),
    SamplerSpec("uni_pc", "UniPC", s.sample_unipc, aliases=("unipc",)),
    # CompVis' DDIM and PLMS: "uniform" steps, ending at the smallest trained level, 50 steps.
    SamplerSpec(
        "ddim", "DDIM", s.sample_ddim, spacing="uniform", final="sigma_min", default_steps=50,
        options={"eta": 0.0}, stochastic=True,
    ),
    SamplerSpec("plms", "PLMS", s.sample_plms, spacing="uniform", final="sigma_min", default_steps=50),
    SamplerSpec("ddpm", "DDPM", s.sample_ddpm, spacing="uniform", default_steps=100, stochastic=True),
)

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
_LOOKUP = {key.lower(): spec for spec in _SPECS for key in (spec.name, spec.label, *spec.aliases)}


def sampler_names() -> list[str]:
    """The ``--sampler`` choices."""
    return list(SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by its name, A1111 label ("DPM++ 2M Karras") or alias, ignoring case."""
    try:
        return _LOOKUP[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sampler_names()}") from None


def sigmas_for(
    spec: SamplerSpec,
    schedule: NoiseSchedule,
    num_steps: int | None = None,
    *,
    spacing: Spacing | None = None,
    steps_offset: int = 0,
) -> Tensor:
    """The sigma sequence a sampler runs by default (steps and spacing may be overridden)."""
    return make_sigmas(
        schedule,
        num_steps or spec.default_steps,
        spacing or spec.spacing,
        steps_offset=steps_offset,
        final=spec.final,
    )
