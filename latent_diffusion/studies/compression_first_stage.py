"""Stage 1 of the compression study: train the autoencoder of one factor, and measure what it keeps.

The recipe is the built-in shapes autoencoder's (MSE, a KL weight of 1e-6 or the VQ codebook loss,
no perceptual or adversarial term: flat colours need neither), with the same steps for every f.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from latent_diffusion.data.shapes import ShapesDataset
from latent_diffusion.evaluation.frechet import frechet_distance
from latent_diffusion.evaluation.shapes_classifier import ShapesClassifier, extract_features, read_scenes
from latent_diffusion.evaluation.shapes_eval import EvalPrompt, score_readings
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
from latent_diffusion.studies.compression_models import first_stage_config, latent_side
from latent_diffusion.studies.resumable import step_generator, train_resumably
from latent_diffusion.training.autoencoder import encode_decode, init_logvar
from latent_diffusion.training.config import OptimConfig
from latent_diffusion.training.loop import adamw, learning_rate, set_learning_rate
from latent_diffusion.training.metrics import psnr

KL_WEIGHT = 1e-6
OPTIM = OptimConfig(lr=1e-3, betas=(0.5, 0.9), warmup_steps=50, schedule="cosine", min_lr_ratio=0.05)
RESULTS = "results.json"
WEIGHTS = "first_stage.pt"


def images_and_scenes(count: int, seed: int) -> tuple[torch.Tensor, list]:
    """The first ``count`` items of the procedural shapes dataset of ``seed``, rendered."""
    dataset = ShapesDataset(count, seed=seed)
    samples = [dataset[i] for i in range(count)]
    return torch.stack([s.image for s in samples]), samples


def build_first_stage(f: int, kind: str) -> AutoencoderKL | VQModel:
    config = first_stage_config(f, kind)
    return AutoencoderKL(config) if kind == "kl" else VQModel(config)


@torch.no_grad()
def reconstruct(model: AutoencoderKL | VQModel, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        latent = model.encode(chunk).mode() if isinstance(model, AutoencoderKL) else model.encode(chunk)
        parts.append(model.decode(latent).clamp(-1, 1))
    return torch.cat(parts)


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor, samples,
                           classifier: ShapesClassifier) -> dict[str, float]:
    """PSNR, the judge's accuracy on the reconstructions, and their Fréchet distance to the originals."""
    prompts = [EvalPrompt(s.caption, s.scene, "reconstruction") for s in samples]
    accuracy = score_readings(read_scenes(classifier, reconstructions), prompts)["reconstruction"]
    attributes = [accuracy[name] for name in ("shape", "colour", "size", "position", "background")]
    lossless = reconstructions is originals
    return {
        "psnr": float("inf") if lossless else float(psnr((reconstructions + 1) / 2, (originals + 1) / 2).mean()),
        "attribute_accuracy": sum(attributes) / len(attributes),
        "scene_accuracy": accuracy["scene"],
        "frechet_distance": frechet_distance(extract_features(classifier, reconstructions),
                                             extract_features(classifier, originals)),
    }


def train_first_stage(directory: Path, f: int, kind: str, *, steps: int, batch: int, seed: int,
                      log=print) -> AutoencoderKL | VQModel:
    """Train (or finish training) the autoencoder of ``f`` in ``directory``; returns it in eval mode."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS
    torch.manual_seed(seed)
    model = build_first_stage(f, kind)
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()
    if isinstance(model, AutoencoderKL):
        init_logvar(model, -6.0)
    optimizer = adamw(model.parameters(), OPTIM)
    dataset = ShapesDataset(steps * batch, seed=seed)
    started = time.perf_counter()

    def step_fn(step: int) -> None:
        set_learning_rate(optimizer, learning_rate(step, OPTIM, steps))
        images = torch.stack([dataset[step * batch + i].image for i in range(batch)])
        generators = [step_generator(seed, f, step, i) for i in range(batch)]
        reconstruction, regulariser, _ = encode_decode(model, images, generators)
        loss = (reconstruction - images).square().mean() + (KL_WEIGHT * regulariser if kind == "kl" else regulariser)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  {kind.upper()} f={f}: step {step + 1}/{steps}, loss {loss.item():.5f}")

    train_resumably(directory / "state.pt", model, optimizer, steps, [steps // 2], step_fn)
    torch.save(model.state_dict(), weights)
    (directory / "train_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return model.eval()


def evaluate_first_stage(directory: Path, model: AutoencoderKL | VQModel | None, f: int, kind: str,
                         originals: torch.Tensor, samples, classifier: ShapesClassifier, steps: int) -> dict:
    """Reconstruction figures of one first stage (``model`` None: f = 1, pixels kept as they are)."""
    results_path = directory / RESULTS
    if results_path.is_file():
        return json.loads(results_path.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    reconstructions = originals if model is None else reconstruct(model, originals)
    seconds = directory / "train_seconds.txt"
    results = {
        "f": f, "kind": kind if model is not None else "none", "latent": _latent_shape(model, f),
        "parameters": 0 if model is None else sum(p.numel() for p in model.parameters()),
        "steps": 0 if model is None else steps,
        "train_seconds": float(seconds.read_text()) if seconds.is_file() else 0.0,
        **reconstruction_metrics(originals, reconstructions, samples, classifier),
    }
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def _latent_shape(model, f: int) -> list[int]:
    side = latent_side(f)
    return [3, side, side] if model is None else [model.config.embed_dim, side, side]
