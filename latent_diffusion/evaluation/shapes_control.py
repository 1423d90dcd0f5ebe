"""Score a ControlNet on the shapes world: does the shape go where the control map draws it?

Each case is one object (a seen colour-shape pair) at two different positions: P, where the control
map (canny edges of a render of the scene) draws it, and Q, where the prompt puts it. The shapes
classifier reads each generated image back; a ControlNet that works puts the object at P, while the
same model without it follows the prompt to Q. Shape and colour are scored at P too: the map
carries the outline, the prompt the colour.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from latent_diffusion.data.shapes import (
    BACKGROUNDS, POSITIONS, SIZES, RenderJitter, Scene, allowed_pairs, caption_for, render_scene,
)
from latent_diffusion.evaluation.shapes_classifier import SceneReading, ShapesClassifier, read_scenes

# canny's default thresholds, as ``ldm train configs/shapes/controlnet-canny.yaml`` trains with.
CANNY_THRESHOLDS = (100.0, 200.0)
MEASURES = ("at_map", "at_prompt", "only_at_map", "shape_at_map", "colour_at_map")


@dataclass(frozen=True)
class ControlCase:
    """One case: the scene the map is made from (object at P) and the caption (same object at Q)."""

    map_scene: Scene
    caption: str
    prompt_position: str

    @property
    def map_position(self) -> str:
        return self.map_scene.objects[0].position


def control_cases(count: int = 60, seed: int = 2024) -> list[ControlCase]:
    """``count`` cases: pairs and sizes cycle, P, Q (always another position) and the background are drawn."""
    if count < 1:
        raise ValueError(f"the number of control cases must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    pairs = allowed_pairs("train")
    cases = []
    for index in range(count):
        colour, shape = pairs[index % len(pairs)]
        size = SIZES[(index // len(pairs)) % len(SIZES)]
        at_map, at_prompt = (POSITIONS[i] for i in rng.choice(len(POSITIONS), size=2, replace=False))
        scene = Scene.single(shape, colour, size, at_map, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
        prompt_scene = Scene(tuple(replace(o, position=at_prompt) for o in scene.objects), scene.background)
        cases.append(ControlCase(scene, caption_for(prompt_scene, "natural"), at_prompt))
    return cases


def control_map(scene: Scene, size: int = 64, seed: int = 0) -> Image.Image:
    """The canny map (white edges on black) of a render of ``scene``, made as training makes its maps."""
    from latent_diffusion.pipelines.preprocessors import canny

    render = render_scene(scene, size, seed=seed, jitter=RenderJitter())
    return Image.fromarray(canny(render, *CANNY_THRESHOLDS))


def score_control_reading(reading: SceneReading, case: ControlCase) -> dict[str, bool]:
    """Where the classifier found objects, against P and Q, and what it read at P."""
    wanted = case.map_scene.objects[0]
    by_position = {o.position: o for o in reading.objects}
    found = by_position.get(case.map_position)
    return {
        "at_map": found is not None,
        "at_prompt": case.prompt_position in by_position,
        "only_at_map": found is not None and reading.count == 1,
        "shape_at_map": found is not None and found.shape == wanted.shape,
        "colour_at_map": found is not None and found.colour == wanted.colour,
    }


def evaluate_control(generate: Callable[[str, Image.Image, int], object], cases: Sequence[ControlCase],
                     classifier: ShapesClassifier, *, size: int = 64, seed: int = 0) -> dict[str, float]:
    """The share of cases meeting each measure; ``generate(caption, map, index)`` returns one image
    (a (3, H, W) tensor in [-1, 1], an (H, W, 3) uint8 array or a PIL image)."""
    from latent_diffusion.evaluation.shapes_eval import as_image_tensor

    images = torch.stack([as_image_tensor(generate(case.caption, control_map(case.map_scene, size, seed + i), i))
                          for i, case in enumerate(cases)])
    hits = [score_control_reading(reading, case) for reading, case in zip(read_scenes(classifier, images), cases)]
    return {name: float(np.mean([h[name] for h in hits])) for name in MEASURES}


def format_control_report(results: dict[str, dict[str, float]], count: int) -> str:
    """A plain-text table: one row per setting (with / without the ControlNet), one column per measure."""
    lines = [f"{count} cases: the map draws the object at P, the prompt asks for it at Q != P",
             f"{'':<18}" + "".join(f"{name:>15}" for name in MEASURES)]
    for label, row in results.items():
        lines.append(f"{label:<18}" + "".join(f"{row[name]:>15.3f}" for name in MEASURES))
    return "\n".join(lines)
