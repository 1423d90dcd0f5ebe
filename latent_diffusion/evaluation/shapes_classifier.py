"""A small CNN that reads a shapes-world scene back from an image, and its training script.

The output is organised by canvas position rather than by object order: for each of the five
positions it says which shape is there (or none), its colour and its size, plus the background.
Object count and object positions follow from which positions are occupied, and no ordering
convention between objects is needed.

Retrain the shipped weights with ``python -m latent_diffusion.evaluation.shapes_classifier --train``.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latent_diffusion.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    RenderJitter,
    Scene,
    ShapeObject,
    image_to_tensor,
    render_scene,
    sample_scene,
)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "shapes_classifier.safetensors"
INPUT_RESOLUTION = 64
FEATURE_DIM = 256
EMPTY = 0  # class 0 of a position's shape head: nothing there
IGNORE = -100  # colour and size of an empty position carry no loss

# Wider variation than the dataset's default, so the reader tolerates imperfect generated images.
TRAINING_JITTER = RenderJitter(position=0.025, scale=0.1)
# The scenes it learns and is checked on: one and two objects, three in a row or column, and alike
# objects (sample_scene's options), as the built-in model draws them.
SCENE_MIX = {"three_object_probability": 0.2, "same_kind_probability": 0.2}


@dataclass(frozen=True)
class ShapesLogits:
    """Classifier outputs: per position (B, 5, classes) for shape (+empty), colour, size; (B, 3) background."""

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor


@dataclass(frozen=True)
class SceneReading:
    """What the classifier sees in one image: the objects it found (in POSITIONS order) and the background."""

    objects: tuple[ShapeObject, ...]
    background: str

    @property
    def count(self) -> int:
        """Number of objects found."""
        return len(self.objects)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
    )


class ShapesClassifier(nn.Module):
    """Four conv stages down to 4x4, one hidden layer of FEATURE_DIM features, and one linear head per attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            _conv_block(3, 32, 2),  # 32x32
            _conv_block(32, 64, 2),  # 16x16
            _conv_block(64, 96, 2),  # 8x8
            _conv_block(96, 128, 2),  # 4x4
        )
        # Flattening (not pooling) keeps where on the canvas each feature came from.
        self.embed = nn.Linear(128 * 4 * 4, FEATURE_DIM)
        positions = len(POSITIONS)
        self.shape_head = nn.Linear(FEATURE_DIM, positions * (len(SHAPES) + 1))
        self.colour_head = nn.Linear(FEATURE_DIM, positions * len(COLOURS))
        self.size_head = nn.Linear(FEATURE_DIM, positions * len(SIZES))
        self.background_head = nn.Linear(FEATURE_DIM, len(BACKGROUNDS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, FEATURE_DIM) features (used for the Fréchet distance)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        if images.shape[-2:] != (INPUT_RESOLUTION, INPUT_RESOLUTION):
            images = F.interpolate(
                images.float(), size=(INPUT_RESOLUTION, INPUT_RESOLUTION), mode="bilinear",
                antialias=True, align_corners=False,
            )
        return F.silu(self.embed(self.encoder(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> ShapesLogits:
        """Logits of every attribute at every position."""
        hidden = self.features(images)
        batch, positions = hidden.shape[0], len(POSITIONS)
        return ShapesLogits(
            shape=self.shape_head(hidden).view(batch, positions, -1),
            colour=self.colour_head(hidden).view(batch, positions, -1),
            size=self.size_head(hidden).view(batch, positions, -1),
            background=self.background_head(hidden),
        )


@dataclass(frozen=True)
class SceneTargets:
    """Training targets laid out like ShapesLogits: class indices, IGNORE where a position is empty."""

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor


def scene_targets(scenes: Sequence[Scene]) -> SceneTargets:
    """Per-position class indices of a batch of scenes."""
    positions = len(POSITIONS)
    shape = torch.full((len(scenes), positions), EMPTY, dtype=torch.long)
    colour = torch.full((len(scenes), positions), IGNORE, dtype=torch.long)
    size = torch.full((len(scenes), positions), IGNORE, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            slot = POSITIONS.index(obj.position)
            shape[row, slot] = SHAPES.index(obj.shape) + 1
            colour[row, slot] = COLOURS.index(obj.colour)
            size[row, slot] = SIZES.index(obj.size)
    background = torch.tensor([BACKGROUNDS.index(scene.background) for scene in scenes], dtype=torch.long)
    return SceneTargets(shape, colour, size, background)


def classifier_loss(logits: ShapesLogits, targets: SceneTargets) -> torch.Tensor:
    """Sum of the cross-entropies of all heads."""
    return (
        F.cross_entropy(logits.shape.flatten(0, 1), targets.shape.flatten())
        + F.cross_entropy(logits.colour.flatten(0, 1), targets.colour.flatten(), ignore_index=IGNORE)
        + F.cross_entropy(logits.size.flatten(0, 1), targets.size.flatten(), ignore_index=IGNORE)
        + F.cross_entropy(logits.background, targets.background)
    )


def decode_readings(logits: ShapesLogits) -> list[SceneReading]:
    """Turn logits into one SceneReading per image."""
    shape = logits.shape.argmax(-1).tolist()
    colour = logits.colour.argmax(-1).tolist()
    size = logits.size.argmax(-1).tolist()
    background = logits.background.argmax(-1).tolist()
    readings = []
    for row in range(len(background)):
        objects = tuple(
            ShapeObject(SHAPES[shape[row][slot] - 1], COLOURS[colour[row][slot]], SIZES[size[row][slot]], position)
            for slot, position in enumerate(POSITIONS)
            if shape[row][slot] != EMPTY
        )
        readings.append(SceneReading(objects, BACKGROUNDS[background[row]]))
    return readings


@torch.no_grad()
def read_scenes(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> list[SceneReading]:
    """Read the scene of each image of a (B, 3, H, W) batch in [-1, 1]."""
    readings: list[SceneReading] = []
    for start in range(0, images.shape[0], batch_size):
        readings.extend(decode_readings(model(images[start:start + batch_size].float())))
    return readings


@torch.no_grad()
def extract_features(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B, FEATURE_DIM) features of a batch of images in [-1, 1]."""
    chunks = [model.features(images[start:start + batch_size].float()) for start in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks)


def load_shapes_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesClassifier:
    """The shipped (or a retrained) classifier in eval mode, weights in float32."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"no shapes classifier weights at {path}; train them with "
            "`python -m latent_diffusion.evaluation.shapes_classifier --train`"
        )
    state_dict = {key: value.float() for key, value in load_file(str(path), device=str(device)).items()}
    with torch.device("meta"):
        model = ShapesClassifier()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Training

def render_batch(
    rng: np.random.Generator, count: int, *, split: str = "all", jitter: RenderJitter = TRAINING_JITTER
) -> tuple[torch.Tensor, list[Scene]]:
    """`count` fresh random scenes (SCENE_MIX) and their 64x64 renders, (count, 3, 64, 64) in [-1, 1]."""
    scenes = [sample_scene(rng, split, **SCENE_MIX) for _ in range(count)]
    images = torch.stack([
        image_to_tensor(render_scene(scene, INPUT_RESOLUTION, seed=int(rng.integers(2**63 - 1)), jitter=jitter))
        for scene in scenes
    ])
    return images, scenes


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur and noise, standing in for the softness and grain of generated images."""
    batch = images.shape[0]
    kernel_1d = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    use_blur = (torch.rand(batch, 1, 1, 1, generator=generator) < 0.3).float()
    images = use_blur * blurred + (1 - use_blur) * images
    noise_level = torch.rand(batch, 1, 1, 1, generator=generator) * 0.1
    return images + noise_level * torch.randn(images.shape, generator=generator)


def attribute_accuracy(readings: Sequence[SceneReading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Exact per-position accuracy of readings against true scenes, attribute by attribute."""
    correct = {"shape": 0, "colour": 0, "size": 0, "position": 0, "background": 0, "count": 0}
    objects = 0
    for reading, scene in zip(readings, scenes, strict=True):
        found = {obj.position: obj for obj in reading.objects}
        for obj in scene.objects:
            objects += 1
            seen = found.get(obj.position)
            correct["position"] += seen is not None
            correct["shape"] += seen is not None and seen.shape == obj.shape
            correct["colour"] += seen is not None and seen.colour == obj.colour
            correct["size"] += seen is not None and seen.size == obj.size
        correct["background"] += reading.background == scene.background
        correct["count"] += reading.count == len(scene.objects)
    per_image = {"background", "count"}
    return {name: value / (len(scenes) if name in per_image else objects) for name, value in correct.items()}


def evaluate_classifier(model: ShapesClassifier, count: int = 500, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on `count` fresh renders with the dataset's default jitter."""
    images, scenes = render_batch(np.random.default_rng(seed), count, jitter=RenderJitter())
    return attribute_accuracy(read_scenes(model, images), scenes)


def train_classifier(
    steps: int = 2400, batch_size: int = 64, learning_rate: float = 3e-3, seed: int = 0, log_every: int = 100
) -> ShapesClassifier:
    """Train on freshly rendered batches (no image is seen twice), with a cosine learning-rate decay."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ShapesClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = max(steps // 20, 1)
    started = time.perf_counter()
    for step in range(steps):
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * scale
        images, scenes = render_batch(rng, batch_size)
        loss = classifier_loss(model(_degrade(images, generator)), scene_targets(scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s", flush=True)
    return model.eval()


def save_classifier(model: ShapesClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Store the weights as fp16 safetensors."""
    from safetensors.torch import save_file

    state_dict = {key: value.detach().half().contiguous() for key, value in model.state_dict().items()}
    save_file(state_dict, str(path), metadata=metadata)


def main(argv: Sequence[str] | None = None) -> None:
    """Train (and save) or evaluate the shapes classifier."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train a new classifier and save it")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=DEFAULT_WEIGHTS, help="weights file to write or read")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        model = train_classifier(args.steps, args.batch_size, seed=args.seed)
        # Score the fp16 copy that is shipped, not the fp32 model in memory.
        save_classifier(model, args.output, {"steps": str(args.steps), "batch_size": str(args.batch_size)})
    model = load_shapes_classifier(args.output)
    accuracy = evaluate_classifier(model)
    print("accuracy on 500 fresh renders: " + ", ".join(f"{name} {value:.4f}" for name, value in accuracy.items()))


if __name__ == "__main__":
    main()
