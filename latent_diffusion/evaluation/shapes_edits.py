"""Editing with the shapes models, scored by the attribute classifier.

Three tasks, each on fresh renders from a fixed seed:

- **inpaint**: a two-object scene side by side; the left half is masked and the prompt names a
  different left object. Success: the classifier reads the new left object (shape and colour) and
  the untouched right object as before.
- **recolour** (img2img): a one-object scene redrawn with a prompt that changes only the colour.
  Success: the new colour, with shape, size and position kept.
- **upscale** (super-resolution model): a render reduced to 16x16 by area averaging and brought back
  to 64x64. Success: the classifier reads the whole scene right; PSNR against the render is
  reported next to bicubic resizing's.

    python -m latent_diffusion.evaluation.shapes_edits            # the built-in models
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from latent_diffusion.data.shapes import (
    BACKGROUNDS, COLOURS, SHAPES, Scene, ShapeObject, allowed_pairs, caption_for, image_to_tensor, render_scene,
)
from latent_diffusion.evaluation.shapes_classifier import SceneReading, load_shapes_classifier, read_scenes

RESOLUTION = 64


@dataclass(frozen=True)
class EditCase:
    """One edit: the input scene, the scene the edit should produce, and the prompt that asks for it."""

    source: Scene
    target: Scene
    prompt: str


def _pil(scene: Scene, seed: int) -> Image.Image:
    return Image.fromarray(render_scene(scene, RESOLUTION, seed=seed))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return image_to_tensor(np.asarray(image.convert("RGB")))


def inpaint_cases(count: int, seed: int = 0) -> list[EditCase]:
    """Side-by-side pairs whose left object is to be replaced by another seen colour-shape pair."""
    rng = np.random.default_rng(seed)
    pairs = allowed_pairs("train")
    cases = []
    for _ in range(count):
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]

        def draw(exclude: tuple[str, str] | None = None) -> ShapeObject:
            while True:
                colour, shape = pairs[rng.integers(len(pairs))]
                if (colour, shape) != exclude:
                    return ShapeObject(shape, colour, "large", "left")

        old, right, new = draw(), draw(), None
        new = draw(exclude=(old.colour, old.shape))
        source = Scene.pair(old, "left of", right, background)
        target = Scene.pair(new, "left of", right, background)
        cases.append(EditCase(source, target, caption_for(target)))
    return cases


def recolour_cases(count: int, seed: int = 0) -> list[EditCase]:
    """One large object, to be redrawn in another colour (both colour-shape pairs seen in training)."""
    rng = np.random.default_rng(seed)
    seen = set(allowed_pairs("train"))
    cases = []
    while len(cases) < count:
        shape = SHAPES[rng.integers(len(SHAPES))]
        old, new = (COLOURS[i] for i in rng.choice(len(COLOURS), 2, replace=False))
        if (old, shape) not in seen or (new, shape) not in seen:
            continue
        position = ("left", "right", "top", "bottom", "center")[rng.integers(5)]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        source = Scene.single(shape, old, "large", position, background)
        target = Scene.single(shape, new, "large", position, background)
        cases.append(EditCase(source, target, caption_for(target)))
    return cases


def _object_at(reading: SceneReading, position: str) -> ShapeObject | None:
    return next((obj for obj in reading.objects if obj.position == position), None)


def inpaint_success(reading: SceneReading, case: EditCase) -> bool:
    new, kept = case.target.objects
    left, right = _object_at(reading, "left"), _object_at(reading, "right")
    return (left is not None and right is not None and (left.shape, left.colour) == (new.shape, new.colour)
            and (right.shape, right.colour) == (kept.shape, kept.colour) and reading.background == case.target.background)


def recolour_success(reading: SceneReading, case: EditCase) -> bool:
    (want,) = case.target.objects
    seen = _object_at(reading, want.position)
    return (reading.count == 1 and seen is not None
            and (seen.shape, seen.colour, seen.size) == (want.shape, want.colour, want.size))


def left_half_mask() -> Image.Image:
    mask = np.zeros((RESOLUTION, RESOLUTION), dtype=np.uint8)
    mask[:, : RESOLUTION // 2] = 255
    return Image.fromarray(mask)


def run_inpaint(pipe, cases: Sequence[EditCase], *, steps: int = 20, guidance: float = 3.0, seed: int = 0):
    images = [pipe.inpaint(case.prompt, _pil(case.source, seed + i), left_half_mask(), steps=steps,
                           guidance_scale=guidance, seed=seed + i).images[0] for i, case in enumerate(cases)]
    return images


def run_recolour(pipe, cases: Sequence[EditCase], *, strength: float = 0.7, steps: int = 20, guidance: float = 3.0,
                 seed: int = 0):
    return [pipe.img2img(case.prompt, _pil(case.source, seed + i), strength=strength, steps=steps,
                         guidance_scale=guidance, seed=seed + i).images[0] for i, case in enumerate(cases)]


def run_upscale(pipe, scenes: Sequence[Scene], *, steps: int = 20, seed: int = 0):
    """(upscaled, bicubic, renders) for each scene's render reduced to 16x16 by area averaging."""
    renders = [_pil(scene, seed + i) for i, scene in enumerate(scenes)]
    small = [render.resize((16, 16), Image.BOX) for render in renders]
    upscaled = [pipe.upscale(image, steps=steps, guidance_scale=1.0, seed=seed + i).images[0]
                for i, image in enumerate(small)]
    bicubic = [image.resize((RESOLUTION, RESOLUTION), Image.BICUBIC) for image in small]
    return upscaled, bicubic, renders


def psnr(images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    a = torch.stack([_to_tensor(i) for i in images])
    b = torch.stack([_to_tensor(i) for i in references])
    mse = ((a - b) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


def read(classifier, images: Sequence[Image.Image]) -> list[SceneReading]:
    return read_scenes(classifier, torch.stack([_to_tensor(image) for image in images]))


def main(argv: Sequence[str] | None = None) -> None:
    from latent_diffusion.pipelines.common import Pipeline, default_upscaler_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="text-to-image model (default: the built-in one)")
    parser.add_argument("--upscaler", default=None, help="super-resolution model (default: the built-in one)")
    parser.add_argument("--count", type=int, default=24, help="cases per task")
    parser.add_argument("--strength", type=float, default=0.7, help="img2img strength for recolouring")
    parser.add_argument("--grid", default=None, help="write a PNG of the first cases (input | output per task)")
    args = parser.parse_args(argv)
    classifier = load_shapes_classifier()
    with torch.no_grad():
        pipe = Pipeline.from_checkpoint(args.checkpoint, progress=False)
        painted_cases, recolour = inpaint_cases(args.count), recolour_cases(args.count)
        painted = run_inpaint(pipe, painted_cases)
        recoloured = run_recolour(pipe, recolour, strength=args.strength)
        upscaler = Pipeline.from_checkpoint(args.upscaler or default_upscaler_path(), progress=False)
        scenes = [case.source for case in recolour_cases(args.count, seed=1)]
        upscaled, bicubic, renders = run_upscale(upscaler, scenes)
    inpaint_rate = np.mean([inpaint_success(r, c) for r, c in zip(read(classifier, painted), painted_cases)])
    recolour_rate = np.mean([recolour_success(r, c) for r, c in zip(read(classifier, recoloured), recolour)])
    scene_right = lambda images: np.mean([  # noqa: E731
        recolour_success(r, EditCase(s, s, "")) and r.background == s.background for r, s in zip(read(classifier, images), scenes)])
    print(f"inpaint (replace the left object): {inpaint_rate:.3f} of {args.count}")
    print(f"img2img recolour (strength {args.strength}): {recolour_rate:.3f} of {args.count}")
    print(f"upscale 16->64: scene read right {scene_right(upscaled):.3f} (bicubic {scene_right(bicubic):.3f}); "
          f"PSNR {psnr(upscaled, renders):.2f} dB (bicubic {psnr(bicubic, renders):.2f} dB)")
    if args.grid:
        rows = []
        for index in range(min(4, args.count)):
            cells = [_pil(painted_cases[index].source, index), painted[index], _pil(recolour[index].source, index),
                     recoloured[index], bicubic[index], upscaled[index]]
            row = Image.new("RGB", (RESOLUTION * len(cells), RESOLUTION))
            for column, cell in enumerate(cells):
                row.paste(cell.convert("RGB"), (column * RESOLUTION, 0))
            rows.append(row)
        grid = Image.new("RGB", (rows[0].width, RESOLUTION * len(rows)))
        for index, row in enumerate(rows):
            grid.paste(row, (0, index * RESOLUTION))
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(args.grid)


if __name__ == "__main__":
    main()
