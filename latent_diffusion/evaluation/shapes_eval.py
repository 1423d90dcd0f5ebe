"""Score a text-to-image generator on the shapes world.

A fixed prompt set (one-object scenes with seen colour-shape pairs, two-object scenes with seen
pairs, and one-object scenes with held-out pairs) is generated, the shapes classifier reads each
image back, and the readings are compared with the prompts attribute by attribute. A Fréchet
distance on the classifier's features compares generated images with renders of the same scenes.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from latent_diffusion.data.shapes import (
    BACKGROUNDS,
    POSITIONS,
    RELATIONS,
    SIZES,
    CaptionError,
    RenderJitter,
    Scene,
    ShapeObject,
    allowed_pairs,
    caption_for,
    image_to_tensor,
    parse_caption,
    render_scene,
)
from latent_diffusion.data.shapes_speech import Description
from latent_diffusion.evaluation.frechet import frechet_distance
from latent_diffusion.evaluation.shapes_classifier import (
    SceneReading,
    ShapesClassifier,
    extract_features,
    load_shapes_classifier,
    read_scenes,
)

GROUPS = ("single_seen", "two_seen", "held_out")  # the fixed prompt set's
FILE_GROUP = "prompts"  # prompts read from a file (read_prompt_file)
# Who reads the generated images: the learned classifier, the geometric measurements
# (evaluation/shapes_geometry.py), or both side by side with how often they agree.
JUDGES = ("classifier", "geometric", "both")
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")
IMAGE_ATTRIBUTES = ("background", "count", "scene")


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the fixed set: its caption, the scene it asks for, and its group.

    ``description``: for captions as people write them (data/shapes_speech.py), what the caption
    states; images are then scored on that alone (``scene`` is one scene that fits it).
    """

    caption: str
    scene: Scene
    group: str
    description: Description | None = None


def fixed_prompt_set(single_seen: int = 40, two_seen: int = 40, held_out: int = 24, seed: int = 2024) -> list[EvalPrompt]:
    """The evaluation prompts: colour-shape pairs and sizes cycle, positions, relations and backgrounds are drawn."""
    rng = np.random.default_rng(seed)
    prompts: list[EvalPrompt] = []

    def one_object(pairs: list[tuple[str, str]], index: int) -> Scene:
        colour, shape = pairs[index % len(pairs)]
        size = SIZES[(index // len(pairs)) % len(SIZES)]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        return Scene.single(shape, colour, size, position, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])

    seen_pairs = allowed_pairs("train")
    for index in range(single_seen):
        prompts.append(_prompt(one_object(seen_pairs, index), "single_seen"))
    for index in range(two_seen):
        objects = []
        for _ in range(2):
            colour, shape = seen_pairs[rng.integers(len(seen_pairs))]
            objects.append(ShapeObject(shape, colour, SIZES[rng.integers(len(SIZES))], "center"))
        relation = RELATIONS[index % len(RELATIONS)]
        scene = Scene.pair(objects[0], relation, objects[1], BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
        prompts.append(_prompt(scene, "two_seen"))
    held_out_pairs = allowed_pairs("held_out")
    for index in range(held_out):
        prompts.append(_prompt(one_object(held_out_pairs, index), "held_out"))
    return prompts


def _spoken_caption_kind(description: Description, caption: str) -> str:
    """Which spoken group a caption belongs to, from what it states."""
    objects = description.objects
    if len(objects) > 1 and len(set(objects)) == 1 and _COUNT_WORD.search(caption.lower()):
        return "counts"
    if description.relation is None and all(obj.position is None for obj in objects) and len(objects) < 3:
        return "unplaced"
    return {1: "spoken_one", 2: "spoken_two", 3: "spoken_three"}[len(objects)]


_COUNT_WORD = re.compile(r"\b(two|three|pair)\b")
# Captions as people write them, in groups of what they ask: one object at a named place, two objects
# in a relation ("next to" included), three objects, a count of alike objects, one or two objects with
# no place or relation at all (drawn exactly as many as named), one object of a held-out pair.
SPOKEN_GROUPS = ("spoken_one", "spoken_two", "spoken_three", "counts", "unplaced", "held_out_spoken")
_SPOKEN_DRAWS = {  # sample_scene's split and probabilities for each group's scenes
    "spoken_one": ("train", 0.0, 0.0, 0.0), "spoken_two": ("train", 1.0, 0.0, 0.0),
    "spoken_three": ("train", 0.0, 1.0, 0.0), "counts": ("train", 0.6, 0.4, 1.0),
    "unplaced": ("train", 0.5, 0.0, 0.0), "held_out_spoken": ("held_out", 0.0, 0.0, 0.0),
}


def spoken_prompt_set(per_group: int = 40, seed: int = 2025) -> list[EvalPrompt]:
    """``per_group`` captions as people write them (shapes_speech.describe) of random scenes, for each
    of SPOKEN_GROUPS; each is scored on what it states."""
    from latent_diffusion.data.shapes import sample_scene
    from latent_diffusion.data.shapes_speech import describe, read_description

    rng = np.random.default_rng(seed)
    prompts = []
    for group in SPOKEN_GROUPS:
        split, two, three, alike = _SPOKEN_DRAWS[group]
        found = 0
        for _ in range(200 * per_group):  # a group's captions are a fair share of the draws
            scene = sample_scene(rng, split, two_object_probability=two, three_object_probability=three,
                                 same_kind_probability=alike)
            caption = describe(scene, rng)
            description = read_description(caption)
            kind = "held_out_spoken" if split == "held_out" else _spoken_caption_kind(description, caption)
            if kind == group:
                prompts.append(EvalPrompt(caption, scene, group, description))
                found += 1
                if found == per_group:
                    break
    return prompts


def _prompt(scene: Scene, group: str) -> EvalPrompt:
    return EvalPrompt(caption_for(scene, "natural"), scene, group)


def read_prompt_file(path: str | Path) -> list[EvalPrompt]:
    """Prompts from a text file, one a line: ``PROMPT | CAPTION``, where CAPTION in the shapes grammar
    names the scene PROMPT asks for (so PROMPT may use words the grammar lacks); a line without ``|`` is
    its own caption. Blank lines and lines starting with ``#`` are skipped."""
    prompts: list[EvalPrompt] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, _, caption = (part.strip() for part in line.partition("|"))
        try:
            scene = parse_caption(caption or prompt)
        except CaptionError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        prompts.append(EvalPrompt(prompt, scene, FILE_GROUP))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _object_agreement(wanted: ShapeObject, seen: ShapeObject | None) -> dict[str, bool]:
    return {name: seen is not None and getattr(seen, name) == getattr(wanted, name) for name in OBJECT_ATTRIBUTES}


def score_reading(reading: SceneReading, scene: Scene) -> dict[str, list[bool]]:
    """Per-attribute hits of one reading against the scene asked for.

    Each wanted object is matched to a distinct found object so that the total number of agreeing
    attributes is largest; a wanted object with no partner misses every attribute. 'scene' is the
    exact match of everything, count and background included.
    """
    found: list[ShapeObject | None] = list(reading.objects)
    found += [None] * max(len(scene.objects) - len(found), 0)
    best: list[dict[str, bool]] = []
    best_total = -1
    for chosen in itertools.permutations(range(len(found)), len(scene.objects)):
        agreements = [_object_agreement(wanted, found[slot]) for wanted, slot in zip(scene.objects, chosen)]
        total = sum(sum(agreement.values()) for agreement in agreements)
        if total > best_total:
            best, best_total = agreements, total
    hits = {name: [agreement[name] for agreement in best] for name in OBJECT_ATTRIBUTES}
    hits["background"] = [reading.background == scene.background]
    hits["count"] = [reading.count == len(scene.objects)]
    hits["scene"] = [hits["count"][0] and hits["background"][0] and all(all(a.values()) for a in best)]
    return hits


def _score(reading: SceneReading, prompt: EvalPrompt) -> dict[str, list[bool]]:
    if prompt.description is None:
        return score_reading(reading, prompt.scene)
    from latent_diffusion.data.shapes_speech import score_description

    return score_description(reading.objects, reading.background, prompt.description)


def score_readings(readings: Sequence[SceneReading], prompts: Sequence[EvalPrompt]) -> dict[str, dict[str, float]]:
    """Accuracy per group and attribute (object attributes averaged over objects, the rest over images)."""
    if len(readings) != len(prompts):
        raise ValueError(f"{len(readings)} readings for {len(prompts)} prompts")
    hits: dict[str, dict[str, list[bool]]] = {}
    for reading, prompt in zip(readings, prompts):
        group_hits = hits.setdefault(prompt.group, {name: [] for name in OBJECT_ATTRIBUTES + IMAGE_ATTRIBUTES})
        for name, values in _score(reading, prompt).items():
            group_hits[name].extend(values)
    # An attribute no caption of a group states (the spoken group's sizes, say) has no score: NaN.
    return {
        group: {name: float(np.mean(values)) if values else float("nan") for name, values in group_hits.items()}
        for group, group_hits in hits.items()
    }


def as_image_tensor(image: object) -> torch.Tensor:
    """Accept a (3, H, W) tensor in [-1, 1], an (H, W, 3) uint8 array or a PIL image; return (3, H, W) float32."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"a generated image tensor must be (3, H, W) in [-1, 1], got shape {tuple(tensor.shape)}")
        return tensor
    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"a generated image array must be (H, W, 3) uint8, got {array.shape} {array.dtype}")
    return image_to_tensor(array)


def _stack_same_size(images: Sequence[torch.Tensor]) -> torch.Tensor:
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) != 1:
        raise ValueError(f"generated images differ in size: {sorted(sizes)}")
    return torch.stack(list(images))


def score_images(
    images: torch.Tensor | Sequence[object], prompts: Sequence[EvalPrompt], classifier: ShapesClassifier | None = None
) -> dict[str, dict[str, float]]:
    """Read generated images (one per prompt) with the classifier and score them against their prompts."""
    classifier = classifier if classifier is not None else load_shapes_classifier()
    batch = images if isinstance(images, torch.Tensor) else _stack_same_size([as_image_tensor(i) for i in images])
    return score_readings(read_scenes(classifier, batch), prompts)


def read_geometrically(images: torch.Tensor) -> list[SceneReading]:
    """The geometric judge's reading of each image of a (B, 3, H, W) batch in [-1, 1]."""
    from latent_diffusion.data.shapes import tensor_to_image
    from latent_diffusion.evaluation.shapes_geometry import read_scene_geometrically

    return [read_scene_geometrically(tensor_to_image(image)) for image in images]


def judge_agreement(first: Sequence[SceneReading], second: Sequence[SceneReading],
                    prompts: Sequence[EvalPrompt]) -> dict[str, float]:
    """Per attribute, the share of verdicts (right or wrong, per object or per image) on which two
    judges' readings agree; 'all' pools every attribute's verdicts."""
    agree: dict[str, list[bool]] = {name: [] for name in OBJECT_ATTRIBUTES + IMAGE_ATTRIBUTES}
    for one, other, prompt in zip(first, second, prompts):
        hits, other_hits = _score(one, prompt), _score(other, prompt)
        for name in agree:
            agree[name] += [a == b for a, b in zip(hits[name], other_hits[name])]
    pooled = [value for values in agree.values() for value in values]
    return {**{name: float(np.mean(values)) if values else float("nan") for name, values in agree.items()},
            "all": float(np.mean(pooled))}


@dataclass(frozen=True)
class Failure:
    """One image some judge found not to show its caption: each judge's reading, and who failed it."""

    caption: str
    group: str
    image: torch.Tensor  # (3, H, W) in [-1, 1]
    readings: dict[str, SceneReading]  # judge name -> what it read
    failed_by: tuple[str, ...]


def describe_reading(reading: SceneReading) -> str:
    """A reading in words: its objects (size, colour, shape, place) and the background."""
    objects = ", ".join(f"{o.size} {o.colour} {o.shape} at {o.position}" for o in reading.objects)
    return f"{objects or 'no object'} on {reading.background}"


def find_failures(images: torch.Tensor, prompts: Sequence[EvalPrompt],
                  readings: dict[str, Sequence[SceneReading]]) -> list[Failure]:
    """The images whose whole scene at least one judge (name -> its readings) fails."""
    failures = []
    for index, prompt in enumerate(prompts):
        read = {judge: judged[index] for judge, judged in readings.items()}
        failed_by = tuple(judge for judge, reading in read.items() if not all(_score(reading, prompt)["scene"]))
        if failed_by:
            failures.append(Failure(prompt.caption, prompt.group, images[index], read, failed_by))
    return failures


@dataclass(frozen=True)
class ShapesEvaluation:
    """Accuracy per group and attribute, and the Fréchet distance of classifier features to renders.

    ``accuracy`` is the classifier's reading, or the geometric judge's when it judged alone; with
    both judges, ``geometric_accuracy`` holds the second and ``agreement`` how often they agree.
    """

    accuracy: dict[str, dict[str, float]]
    frechet_distance: float
    image_count: int
    reference_count: int
    judge: str = "classifier"
    geometric_accuracy: dict[str, dict[str, float]] | None = None
    agreement: dict[str, float] | None = None
    failures: tuple[Failure, ...] = ()


def render_reference(prompts: Sequence[EvalPrompt], per_prompt: int = 4, resolution: int = 64, seed: int = 0) -> torch.Tensor:
    """Renders of the prompts' scenes with the dataset's jitter: the 'real' side of the Fréchet distance."""
    rng = np.random.default_rng(seed)
    return torch.stack([
        image_to_tensor(render_scene(prompt.scene, resolution, seed=int(rng.integers(2**63 - 1)), jitter=RenderJitter()))
        for prompt in prompts
        for _ in range(per_prompt)
    ])


def evaluate_generator(
    generate_fn: Callable[[str], object],
    *,
    prompts: Sequence[EvalPrompt] | None = None,
    classifier: ShapesClassifier | None = None,
    images_per_prompt: int = 1,
    reference_per_prompt: int = 4,
    seed: int = 0,
    judge: str = "classifier",
) -> ShapesEvaluation:
    """Generate `images_per_prompt` images per prompt with `generate_fn(caption)` and score the lot.

    `generate_fn` returns a (3, H, W) tensor in [-1, 1], an (H, W, 3) uint8 array or a PIL image;
    it is called once per image, so a stochastic generator gives different samples of one prompt.
    The Fréchet distance of small sets is biased upwards by covariance estimation, so compare
    models only at equal prompt and image counts.
    """
    if judge not in JUDGES:
        raise ValueError(f"judge must be one of {', '.join(JUDGES)}, got {judge!r}")
    if images_per_prompt < 1 or reference_per_prompt < 1:
        raise ValueError("images_per_prompt and reference_per_prompt must be at least 1")
    base_prompts = list(prompts) if prompts is not None else fixed_prompt_set()
    if not base_prompts:
        raise ValueError("the prompt set is empty")
    prompts = [prompt for prompt in base_prompts for _ in range(images_per_prompt)]
    classifier = classifier if classifier is not None else load_shapes_classifier()
    images = _stack_same_size([as_image_tensor(generate_fn(prompt.caption)) for prompt in prompts])
    learned = read_scenes(classifier, images) if judge != "geometric" else None
    measured = read_geometrically(images) if judge != "classifier" else None
    reference = render_reference(base_prompts, reference_per_prompt * images_per_prompt, seed=seed)
    distance = frechet_distance(extract_features(classifier, images), extract_features(classifier, reference))
    readings = {name: judged for name, judged in (("classifier", learned), ("geometric", measured)) if judged is not None}
    failures = tuple(find_failures(images, prompts, readings))
    if judge == "both":
        return ShapesEvaluation(score_readings(learned, prompts), distance, len(images), len(reference), judge,
                                score_readings(measured, prompts), judge_agreement(learned, measured, prompts),
                                failures)
    accuracy = score_readings(learned if learned is not None else measured, prompts)
    return ShapesEvaluation(accuracy, distance, len(images), len(reference), judge, failures=failures)


def rendering_generator(seed: int = 0, resolution: int = 64) -> Callable[[str], torch.Tensor]:
    """A perfect 'generator' that reads the caption and renders it: the ceiling any model is measured against."""
    from latent_diffusion.data.shapes_speech import read_description, scene_for

    rng = np.random.default_rng(seed)

    def generate(caption: str) -> torch.Tensor:
        scene = scene_for(read_description(caption))
        return image_to_tensor(render_scene(scene, resolution, seed=int(rng.integers(2**63 - 1)), jitter=RenderJitter()))

    return generate


def _accuracy_table(accuracy: dict[str, dict[str, float]]) -> list[str]:
    columns = OBJECT_ATTRIBUTES + IMAGE_ATTRIBUTES
    lines = [f"{'group':<16}" + "".join(f"{name:>11}" for name in columns)]
    for group in (*GROUPS, *SPOKEN_GROUPS, FILE_GROUP):
        if group in accuracy:
            row = accuracy[group]
            lines.append(f"{group:<16}" + "".join(f"{row[name]:>11.3f}" for name in columns))
    return lines


def format_failures(evaluation: ShapesEvaluation) -> str:
    """One line per failed image: its group, caption, who failed it, and each judge's reading."""
    lines = [f"{len(evaluation.failures)} of {evaluation.image_count} images failed by a judge:"]
    for number, failure in enumerate(evaluation.failures):
        lines.append(f"[{number}] {failure.group}: {failure.caption!r} failed by {' and '.join(failure.failed_by)}")
        lines += [f"      {judge} read: {describe_reading(reading)}" for judge, reading in failure.readings.items()]
    return "\n".join(lines)


def format_report(evaluation: ShapesEvaluation) -> str:
    """A plain-text table of the evaluation (one per judge, and their agreement)."""
    lines = _accuracy_table(evaluation.accuracy)
    if evaluation.judge != "classifier":
        lines.insert(0, f"judged by: {'the classifier' if evaluation.judge == 'both' else 'geometry'}")
    if evaluation.geometric_accuracy is not None:
        lines += ["judged by: geometry", *_accuracy_table(evaluation.geometric_accuracy)]
    if evaluation.agreement is not None:
        agreement = evaluation.agreement
        lines.append(f"judges agree on {agreement['all']:.3f} of verdicts ("
                     + ", ".join(f"{name} {agreement[name]:.3f}" for name in OBJECT_ATTRIBUTES + IMAGE_ATTRIBUTES) + ")")
    lines.append(
        f"Fréchet distance (classifier features, {evaluation.image_count} generated vs "
        f"{evaluation.reference_count} rendered): {evaluation.frechet_distance:.4f}"
    )
    return "\n".join(lines)
