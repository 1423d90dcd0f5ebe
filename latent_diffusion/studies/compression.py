"""The paper's central experiment on the shapes world: how much to compress before diffusing.

For each downsampling factor f in {1, 2, 4, 8, 16, 32}: train a KL autoencoder (and a VQ one at
f = 4 and 8) and measure its reconstructions; then train a text-to-image LDM in its latent space
with the same FLOPs as every other f, evaluating at fixed fractions of the budget. Each f is its own
unit of work with its own folder, so processes (or machines) can share the factors and one
``report`` gathers whatever is done. Everything resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from latent_diffusion.studies.compression_models import FACTORS, VQ_FACTORS, check_factor


@dataclass(frozen=True)
class StudyPlan:
    """What one run of the study trains and measures; ``for_budget`` scales the training steps."""

    factors: tuple[int, ...] = FACTORS
    vq_factors: tuple[int, ...] = VQ_FACTORS
    first_stage_steps: int = 300
    first_stage_batch: int = 8
    ldm_steps: int = 450
    pixel_batch: int = 4  # the f = 1 batch; every other f gets the batch of equal FLOPs per step
    latent_pool: int = 4096  # training scenes encoded once per f
    evaluations: int = 3  # at equal fractions of ldm_steps, i.e. of the FLOPs budget
    eval_prompts: int = 32
    reconstruction_images: int = 256
    sample_steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0

    @classmethod
    def for_budget(cls, budget: float = 1.0, **changes) -> StudyPlan:
        if not 0 < budget <= 100:
            raise ValueError(f"--budget must be in (0, 100]; got {budget}")
        base = cls()
        return dataclasses.replace(
            base, first_stage_steps=max(2, round(base.first_stage_steps * budget)),
            ldm_steps=max(base.evaluations, round(base.ldm_steps * budget)), **changes,
        )

    def __post_init__(self) -> None:
        for f in self.factors + self.vq_factors:
            check_factor(f)
        if 1 in self.vq_factors:
            raise ValueError("f = 1 has no first stage to quantise")
        if self.evaluations < 1 or self.ldm_steps < self.evaluations:
            raise ValueError(f"ldm_steps ({self.ldm_steps}) must be at least the number of evaluations ({self.evaluations})")


def first_stage_folder(out: Path, f: int, kind: str) -> Path:
    return out / "runs" / (f"pixels-f{f}" if f == 1 else f"{kind}-f{f}")


def ldm_folder(out: Path, f: int) -> Path:
    return out / "runs" / f"ldm-f{f}"


PLAN_FILE = "plan.json"
COMMANDS_FILE = "commands.txt"  # every command that trained or rescored in the folder, in order


def record_command(out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / COMMANDS_FILE, "a", encoding="utf-8") as file:
        file.write(command + "\n")


def ldm_complete(folder: Path) -> bool:
    results = folder / "results.json"
    return results.is_file() and json.loads(results.read_text()).get("complete", False)


def check_same_plan(out: Path, plan: StudyPlan) -> None:
    """Record the plan in ``out``; refuse to mix results of different plans (the factors may differ)."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = {k: v for k, v in dataclasses.asdict(plan).items() if k not in ("factors", "vq_factors")}
    path = out / PLAN_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
        if changed:
            details = ", ".join(f"{k}: {recorded.get(k)} there, {wanted[k]} now" for k in changed)
            raise StudyError(f"{out} holds a study with another plan ({details}); use another --out or the same --budget")
        return
    path.write_text(json.dumps(wanted, indent=1) + "\n")


class StudyError(ValueError):
    """A study that cannot run as asked (the message says why)."""


def run_study(out: Path, plan: StudyPlan, log=print) -> None:
    """Train and measure every factor of ``plan`` not yet done in ``out``."""
    from latent_diffusion.evaluation.shapes_classifier import load_shapes_classifier
    from latent_diffusion.studies.compression_first_stage import images_and_scenes
    from latent_diffusion.studies.compression_judge import Judge
    from latent_diffusion.studies.compression_ldm import LDMRun, TextEncoder, encode_pool

    check_same_plan(out, plan)
    classifier = load_shapes_classifier()
    judge = Judge(plan.eval_prompts, plan.seed, classifier)
    # Held-out scenes for reconstructions: a seed that no training draw of this plan uses.
    held_out = images_and_scenes(plan.reconstruction_images, plan.seed + 1)
    text = TextEncoder.builtin()
    for f in plan.factors:
        started = time.perf_counter()
        first_stage = _first_stages(out, f, plan, held_out, classifier, log)
        if ldm_complete(ldm_folder(out, f)):
            continue
        pool = encode_pool(first_stage, text, plan.latent_pool, plan.seed)
        LDMRun(ldm_folder(out, f), f, first_stage, pool, plan, text, judge, log=log).train()
        log(f"f={f} done in {time.perf_counter() - started:.0f} s")


def _first_stages(out: Path, f: int, plan: StudyPlan, held_out, classifier, log):
    """Train and measure f's first stages (none at f = 1); returns the KL one, which the LDM uses."""
    from latent_diffusion.studies.compression_first_stage import evaluate_first_stage, train_first_stage

    originals, samples = held_out
    kinds = ["none"] if f == 1 else ["kl"] + (["vq"] if f in plan.vq_factors else [])
    used = None
    for kind in kinds:
        folder = first_stage_folder(out, f, kind)
        model = None if kind == "none" else train_first_stage(
            folder, f, kind, steps=plan.first_stage_steps, batch=plan.first_stage_batch, seed=plan.seed, log=log)
        figures = evaluate_first_stage(folder, model, f, kind, originals, samples, classifier, plan.first_stage_steps)
        log(f"f={f} {figures['kind']}: PSNR {figures['psnr']:.2f} dB, judge {figures['attribute_accuracy']:.3f}")
        if kind == "kl":
            used = model
    return used


def rescore_study(out: Path) -> int:
    """Score every saved LDM evaluation under ``out`` again with the current judge and metrics."""
    from latent_diffusion.studies.compression_judge import Judge, rescore

    path = out / PLAN_FILE
    if not path.is_file():
        raise StudyError(f"{out} holds no study (no {PLAN_FILE})")
    plan = json.loads(path.read_text())
    runs = sorted(folder for folder in (out / "runs").glob("ldm-f*") if (folder / "results.json").is_file())
    return rescore(runs, Judge(plan["eval_prompts"], plan["seed"]))
