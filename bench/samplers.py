"""Error against the number of model evaluations (NFE) for every sampler, with an exact denoiser.

Data: a 2-D Gaussian mixture whose denoiser E[x0 | x] is known in closed form, so the only error
left is the sampler's. Two tables (markdown), as in docs/samplers.md:

1. Distribution error: sliced Wasserstein-1 distance between generated samples and fresh data
   samples, every registered sampler run as the CLI runs it (its default step spacing on Stable
   Diffusion's noise levels, sigma 14.6 -> 0.029), against a reference sample 8 times larger. The
   last row is the floor: what exact samples of the data, as many, score.
2. ODE error: RMS distance of deterministic samplers' results from the exact probability-flow
   solution (a 4000-step Heun solve from the same start), all on one Karras grid ending at 0.

Usage: python bench/samplers.py [--samples 50000] [--nfe 5 10 20 50 100]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion import samplers
from latent_diffusion.diffusion.analytic import GaussianMixture
from latent_diffusion.diffusion.registry import SAMPLERS, SamplerSpec, sigmas_for
from latent_diffusion.diffusion.schedulers import AUTOMATIC, SCHEDULERS, SchedulerSpec
from latent_diffusion.diffusion.sampling import sample
from latent_diffusion.diffusion.schedules import NoiseSchedule, karras_sigmas

F64 = dict(dtype=torch.float64)
# Four clusters of different widths and weights: multimodal, so a sampler must carve the modes apart.
DATA = GaussianMixture(
    weights=torch.tensor([0.4, 0.3, 0.2, 0.1], **F64),
    means=torch.tensor([[-1.0, -0.5], [1.0, -0.5], [0.0, 1.0], [1.5, 1.5]], **F64),
    stds=torch.tensor([0.35, 0.2, 0.5, 0.1], **F64),
)
SCHEDULE = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.00085, 0.012))
DETERMINISTIC = {
    "euler": samplers.sample_euler,
    "heun": samplers.sample_heun,
    "lms": samplers.sample_lms,
    "plms": samplers.sample_plms,
    "dpmpp_2m": samplers.sample_dpmpp_2m,
    "uni_pc": samplers.sample_unipc,
}


class CountingDenoiser:
    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.denoiser(x, sigma, cond)


def evaluations(run, steps: int) -> int:
    counter = CountingDenoiser(DATA.denoise)
    run(counter, steps, 1)
    return counter.calls


def steps_within(run, nfe: int) -> int | None:
    """The most steps whose model evaluations fit in ``nfe`` (evaluations grow with steps)."""
    if evaluations(run, 1) > nfe:
        return None
    low, high = 1, nfe  # evaluations(run, low) <= nfe; every sampler needs >= 1 evaluation per step
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if evaluations(run, middle) <= nfe else (low, middle - 1)
    return low


def sliced_wasserstein(samples: torch.Tensor, reference: torch.Tensor, directions: int = 32) -> float:
    """Mean over directions of the 1-D Wasserstein-1 distance; ``reference`` may be k times larger."""
    angles = torch.arange(directions, **F64) * math.pi / directions
    projections = torch.stack([angles.cos(), angles.sin()])  # [2, directions]
    k = reference.shape[0] // samples.shape[0]
    ours = (samples @ projections).sort(0).values
    # Quantiles of the larger reference at the samples' quantile levels (i + 1/2) / n.
    theirs = (reference @ projections).sort(0).values[k // 2 :: k][: samples.shape[0]]
    return (ours - theirs).abs().mean().item()


def run_registered(spec: SamplerSpec, scheduler: SchedulerSpec = AUTOMATIC):
    def run(denoiser, steps, n):
        sigmas = sigmas_for(spec, SCHEDULE, steps, scheduler=scheduler)
        return sample(spec, denoiser, sigmas, torch.randn_like, shape=(n, 2), **F64)

    return run


# Every sampler on its own schedule; these also with Karras sigmas (A1111's "... Karras" names).
WITH_KARRAS = ("lms", "dpmpp_2s_ancestral", "dpmpp_2m", "dpmpp_2m_sde")


def registered_runs():
    """(label, spacing, run) of each row of the distribution table."""
    for name, spec in SAMPLERS.items():
        yield f"{spec.label} (`{name}`)", spec.spacing, run_registered(spec)
        if name in WITH_KARRAS:
            yield f"{spec.label} Karras (`{name}_karras`)", "karras", run_registered(spec, SCHEDULERS["karras"])


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def distribution_table(nfes: list[int], num_samples: int) -> str:
    reference = DATA.sample(8 * num_samples, torch.Generator().manual_seed(1))
    rows = []
    for label, spacing, run in registered_runs():
        cells = []
        for nfe in nfes:
            steps = steps_within(run, nfe)
            if steps is None:
                cells.append("-")
                continue
            torch.manual_seed(0)
            cells.append(f"{sliced_wasserstein(run(DATA.denoise, steps, num_samples), reference):.4f}")
        rows.append([label, spacing, *cells])
    floor = sum(
        sliced_wasserstein(DATA.sample(num_samples, torch.Generator().manual_seed(seed)), reference)
        for seed in range(2, 6)
    ) / 4
    rows.append(["*exact samples of the data*", "", *[f"{floor:.4f}"] * len(nfes)])
    return table(
        f"Sliced Wasserstein-1 to the data ({num_samples} samples), at most NFE model evaluations",
        ["sampler", "spacing", *[f"NFE {n}" for n in nfes]],
        rows,
    )


def ode_table(nfes: list[int], num_samples: int) -> str:
    sigma_min, sigma_max = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    x_start = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(3), **F64)
    x_start = x_start * math.hypot(1.0, sigma_max)
    exact = samplers.sample_heun(DATA.denoise, x_start, karras_sigmas(4000, sigma_min, sigma_max))
    rows = []
    for name, sampler in DETERMINISTIC.items():
        def run(denoiser, steps, n, sampler=sampler):
            return sampler(denoiser, x_start[:n], karras_sigmas(steps, sigma_min, sigma_max))

        cells = []
        for nfe in nfes:
            steps = steps_within(run, nfe)
            if steps is None:
                cells.append("-")
                continue
            error = (run(DATA.denoise, steps, num_samples) - exact).pow(2).sum(1).mean().sqrt().item()
            cells.append(f"{error:.2e}")
        rows.append([f"`{name}`", *cells])
    return table(
        "RMS distance from the exact ODE solution (Karras sigmas 14.6 -> 0.029 -> 0)",
        ["sampler", *[f"NFE {n}" for n in nfes]],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: extra threads only add synchronisation
    started = time.perf_counter()
    print(distribution_table(args.nfe, args.samples))
    print()
    print(ode_table(args.nfe, min(args.samples, 4096)))
    print(f"\n(torch {torch.__version__}, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
