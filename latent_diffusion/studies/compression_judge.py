"""How the compression study scores an LDM: its evaluation images, read back from the saved grid.

Scoring the PNG that a run saves (not the tensors it generated) means the figures are those of the
images a user can look at, and can be recomputed from them when the judge or the metrics change
(``ldm study compression --rescore``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latent_diffusion.data.shapes import image_to_tensor
from latent_diffusion.evaluation.frechet import frechet_distance
from latent_diffusion.evaluation.shapes_classifier import extract_features, load_shapes_classifier, read_scenes
from latent_diffusion.evaluation.shapes_eval import EvalPrompt, fixed_prompt_set, render_reference, score_reading
from latent_diffusion.training.loop import save_image_grid

GRID_COLUMNS = 8
# Graded quality: the share of these read right, each object's own attributes averaged over objects.
ATTRIBUTES = ("shape", "colour", "size", "position", "background", "count")


def evaluation_prompts(count: int) -> list[EvalPrompt]:
    """The shapes evaluation's fixed prompts: 3/8 one object, 3/8 two objects, 1/4 held-out pairs."""
    single = two = round(count * 3 / 8)
    return fixed_prompt_set(single_seen=single, two_seen=two, held_out=count - single - two)


def grid_path(folder: Path, step: int) -> Path:
    return folder / f"samples-{step:06d}.png"


def save_grid(images: torch.Tensor, path: Path) -> None:
    save_image_grid(images, path, columns=GRID_COLUMNS)


def read_grid(path: Path, count: int, side: int = 64) -> torch.Tensor:
    """The ``count`` images of a saved grid, row by row, as (count, 3, side, side) in [-1, 1]."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    tiles = [array[(i // GRID_COLUMNS) * side:(i // GRID_COLUMNS + 1) * side,
                   (i % GRID_COLUMNS) * side:(i % GRID_COLUMNS + 1) * side] for i in range(count)]
    return torch.stack([image_to_tensor(tile) for tile in tiles])


class Judge:
    """The shapes classifier, the evaluation prompts and the renders the Fréchet distance compares with."""

    def __init__(self, prompt_count: int, seed: int, classifier=None) -> None:
        self.prompts = evaluation_prompts(prompt_count)
        self.classifier = classifier if classifier is not None else load_shapes_classifier()
        self.reference = extract_features(self.classifier, render_reference(self.prompts, per_prompt=4, seed=seed))

    def score(self, images: torch.Tensor) -> dict:
        """Scene accuracy (everything right), attribute accuracy (graded), per group, Fréchet distance."""
        hits = [score_reading(reading, prompt.scene) for reading, prompt in zip(read_scenes(self.classifier, images),
                                                                                 self.prompts)]
        pooled = {name: [value for hit in hits for value in hit[name]] for name in ATTRIBUTES}
        groups: dict[str, list[bool]] = {}
        for hit, prompt in zip(hits, self.prompts):
            groups.setdefault(prompt.group, []).append(hit["scene"][0])
        return {
            "scene_accuracy": float(np.mean([hit["scene"][0] for hit in hits])),
            "attribute_accuracy": float(np.mean([np.mean(values) for values in pooled.values()])),
            "attributes": {name: float(np.mean(values)) for name, values in pooled.items()},
            "group_scene_accuracy": {group: float(np.mean(values)) for group, values in groups.items()},
            "frechet_distance": frechet_distance(extract_features(self.classifier, images), self.reference),
        }

    def score_grid(self, path: Path) -> dict:
        return self.score(read_grid(path, len(self.prompts)))


def rescore(runs: list[Path], judge: Judge) -> int:
    """Score every saved evaluation grid of the LDM runs in ``runs`` again; returns how many."""
    count = 0
    for folder in runs:
        results_path = folder / "results.json"
        results = json.loads(results_path.read_text())
        for evaluation in results["evaluations"]:
            evaluation.update(judge.score_grid(grid_path(folder, evaluation["step"])))
            count += 1
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    return count
