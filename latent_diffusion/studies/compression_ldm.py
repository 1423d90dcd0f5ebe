"""Stage 2 of the compression study: the text-to-image LDM of one factor, trained and measured.

Every f spends the same training FLOPs per step, and so the same FLOPs at every evaluation: the
batch is what changes (f = 1 sees 4 images a step, f = 32 447). The objective, schedule and
frozen text encoder are the built-in model's (v-prediction, min-SNR 5, DDPM's linear betas).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from latent_diffusion.config import ScheduleConfig
from latent_diffusion.diffusion.denoiser import Conditioning, Denoiser
from latent_diffusion.diffusion.guidance import ClassifierFreeGuidance
from latent_diffusion.diffusion.registry import resolve_sampler, sigmas_for
from latent_diffusion.diffusion.sampling import BatchNoise, sample
from latent_diffusion.diffusion.schedules import NoiseSchedule, alphas_cumprod_for
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.studies.compression_first_stage import images_and_scenes
from latent_diffusion.studies.compression_judge import Judge, grid_path, save_grid
from latent_diffusion.studies.compression_models import (
    CONTEXT_TOKENS, LATENT_CHANNELS, latent_side, unet_config, unet_flops_per_image,
)
from latent_diffusion.studies.resumable import step_generator, train_resumably
from latent_diffusion.training.config import OptimConfig
from latent_diffusion.training.loop import adamw, learning_rate, set_learning_rate
from latent_diffusion.training.objective import min_snr_weight, network_input_and_target

SCHEDULE = ScheduleConfig(kind="linear", timesteps=1000, linear_start=1e-4, linear_end=0.02)
PREDICTION = "v"
MIN_SNR_GAMMA = 5.0
CONDITION_DROP = 0.1
OPTIM = OptimConfig(lr=1e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1)
# A training step is a forward and a backward pass: about three forwards' FLOPs.
TRAIN_FLOPS_PER_FORWARD = 3
RESULTS = "results.json"


@dataclass(frozen=True)
class TextEncoder:
    """The built-in model's frozen caption encoder and its tokenizer, shared by every f."""

    encoder: torch.nn.Module
    tokenizer: object

    @classmethod
    def builtin(cls) -> TextEncoder:
        from latent_diffusion.checkpoints.load import load_checkpoint
        from latent_diffusion.pipelines.common import default_checkpoint_path
        from latent_diffusion.training.ldm_model import make_tokenizer

        loaded = load_checkpoint(default_checkpoint_path())
        return cls(loaded.model.cond_stage_model.eval().requires_grad_(False), make_tokenizer(loaded.spec))

    @torch.no_grad()
    def __call__(self, captions: list[str], batch: int = 256) -> torch.Tensor:
        return torch.cat([self.encoder(self.tokenizer(captions[i:i + batch])) for i in range(0, len(captions), batch)])


@dataclass(frozen=True)
class LatentPool:
    """The training set of one f: latents scaled to unit variance and their encoded captions."""

    latents: torch.Tensor
    contexts: torch.Tensor
    empty_context: torch.Tensor  # the dropped condition, also the unconditional side of guidance
    scale: float


@torch.no_grad()
def encode_pool(first_stage: AutoencoderKL | None, text: TextEncoder, count: int, seed: int) -> LatentPool:
    """Render ``count`` training scenes, encode them once (f = 1: the pixels themselves) and scale them
    to unit variance, by the same rule for every f, so that one noise schedule fits them all."""
    images, samples = images_and_scenes(count, seed)
    if first_stage is None:
        latents = images
    else:
        latents = torch.cat([first_stage.encode(images[i:i + 64]).mode() for i in range(0, count, 64)])
    scale = float(1.0 / latents.std())
    return LatentPool(latents * scale, text([s.caption for s in samples]), text([""]), scale)


def batch_for_equal_flops(f: int, pixel_batch: int) -> tuple[int, int]:
    """(batch, forward FLOPs per latent) that give f's step the FLOPs of ``pixel_batch`` pixel images."""
    per_image = {factor: unet_flops_per_image(UNetModel(unet_config(factor)), factor) for factor in (1, f)}
    return max(1, round(pixel_batch * per_image[1] / per_image[f])), per_image[f]


class LDMRun:
    """One f's LDM: its network, data and optimiser, trained in steps and evaluated at milestones."""

    def __init__(self, directory: Path, f: int, first_stage: AutoencoderKL | None, pool: LatentPool,
                 plan, text: TextEncoder, judge: Judge, log=print) -> None:
        self.directory, self.f, self.first_stage, self.pool, self.plan, self.log = directory, f, first_stage, pool, plan, log
        self.judge = judge
        if pool.contexts.shape[1] != CONTEXT_TOKENS:
            raise ValueError(f"the caption encoder gives {pool.contexts.shape[1]} tokens; "
                             f"the study counts FLOPs for {CONTEXT_TOKENS}")
        torch.manual_seed(plan.seed)
        self.unet = UNetModel(unet_config(f))
        self.batch, self.flops_per_image = batch_for_equal_flops(f, plan.pixel_batch)
        self.optimizer = adamw(self.unet.parameters(), OPTIM)
        self.alphas_cumprod = alphas_cumprod_for(SCHEDULE)
        self.prompts = judge.prompts
        self.prompt_contexts = text([p.caption for p in self.prompts])
        results_path = directory / RESULTS
        self.results = json.loads(results_path.read_text()) if results_path.is_file() else self._fresh_results()

    def _fresh_results(self) -> dict:
        return {
            "f": self.f, "latent": [LATENT_CHANNELS[self.f], latent_side(self.f), latent_side(self.f)],
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "unet_forward_flops_per_image": self.flops_per_image, "batch": self.batch,
            "train_flops_per_step": TRAIN_FLOPS_PER_FORWARD * self.flops_per_image * self.batch,
            "latent_scale": self.pool.scale, "steps": self.plan.ldm_steps, "evaluations": [], "complete": False,
            "wall_seconds": 0.0,  # training and evaluations, summed over the processes that ran it
        }

    def train(self) -> dict:
        if self.results["complete"]:
            return self.results
        self.directory.mkdir(parents=True, exist_ok=True)
        steps = self.plan.ldm_steps
        milestones = [round(steps * (i + 1) / self.plan.evaluations) for i in range(self.plan.evaluations)]
        self._clock = time.perf_counter()
        train_resumably(self.directory / "state.pt", self.unet, self.optimizer, steps, milestones, self._step,
                        self._evaluate)
        self.results["images_per_second"] = self._throughput()
        self.results["complete"] = True
        self._write()
        return self.results

    def _step(self, step: int) -> None:
        set_learning_rate(self.optimizer, learning_rate(step, OPTIM, self.plan.ldm_steps))
        generator = step_generator(self.plan.seed, self.f, step)
        pool = self.pool
        index = torch.randint(len(pool.latents), (self.batch,), generator=generator)
        dropped = torch.rand(self.batch, generator=generator) < CONDITION_DROP
        context = torch.where(dropped.view(-1, 1, 1), pool.empty_context, pool.contexts[index])
        t = torch.randint(0, SCHEDULE.timesteps, (self.batch,), generator=generator)
        x0 = pool.latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        alpha_bar = self.alphas_cumprod[t]
        model_input, target = network_input_and_target(PREDICTION, x0, noise, alpha_bar)
        per_sample = F.mse_loss(self.unet(model_input, t.float(), context=context), target,
                                reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(alpha_bar / (1 - alpha_bar), MIN_SNR_GAMMA, PREDICTION)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, self.plan.ldm_steps // 10) == 0:
            self.log(f"  LDM f={self.f}: step {step + 1}/{self.plan.ldm_steps}, loss {loss.item():.4f}")

    @torch.no_grad()
    def generate(self, contexts: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] for encoded captions: DDIM, the study's step count, classifier-free guidance."""
        self.unet.eval()
        try:
            schedule = NoiseSchedule.from_config(SCHEDULE)
            denoiser = Denoiser(lambda x, t, context=None, y=None: self.unet(x, t, context=context), schedule, PREDICTION)
            guided = ClassifierFreeGuidance(denoiser, Conditioning(context=self.pool.empty_context), self.plan.guidance_scale)
            sampler, scheduler = resolve_sampler("ddim")
            sigmas = sigmas_for(sampler, schedule, self.plan.sample_steps, scheduler=scheduler)
            count, side = len(contexts), latent_side(self.f)
            latents = sample(sampler, guided, sigmas, BatchNoise.from_seed(self.plan.seed, count),
                             shape=(count, LATENT_CHANNELS[self.f], side, side), cond=Conditioning(context=contexts))
            latents = latents / self.pool.scale
            images = latents if self.first_stage is None else self.first_stage.decode(latents)
            return images.clamp(-1, 1)
        finally:
            self.unet.train()

    def _throughput(self, repeats: int = 3) -> float:
        """Images per second generating the evaluation prompts, best of ``repeats``: other work on the
        machine can only slow a run down, so the fastest is the closest to the model's own speed."""
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.generate(self.prompt_contexts)
            seconds.append(time.perf_counter() - started)
        return len(self.prompts) / min(seconds)

    def _evaluate(self, step: int) -> None:
        started = time.perf_counter()
        images = self.generate(self.prompt_contexts)
        seconds = time.perf_counter() - started
        grid = grid_path(self.directory, step)
        save_grid(images, grid)
        evaluation = {"step": step, "train_flops": step * self.results["train_flops_per_step"],
                      **self.judge.score_grid(grid), "sampling_seconds": seconds,
                      "images_per_second": len(images) / seconds}
        self.results["evaluations"] = [e for e in self.results["evaluations"] if e["step"] < step] + [evaluation]
        self.log(f"  LDM f={self.f}: step {step}: attributes {evaluation['attribute_accuracy']:.3f}, scenes "
                 f"{evaluation['scene_accuracy']:.3f}, FD {evaluation['frechet_distance']:.2f}, "
                 f"{evaluation['images_per_second']:.2f} images/s")
        self._write()

    def _write(self) -> None:
        now = time.perf_counter()
        self.results["wall_seconds"] += now - self._clock
        self._clock = now
        (self.directory / RESULTS).write_text(json.dumps(self.results, indent=1) + "\n")
