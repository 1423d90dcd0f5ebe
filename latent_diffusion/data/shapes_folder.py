"""Render the shapes world to an image folder that ``ldm train`` reads (PNG + same-name .txt caption).

    python -m latent_diffusion.data.shapes_folder data/shapes --count 20000 --seed 0

The folder is a pure function of (count, seed, resolution, split, two-object probability):
re-running writes the same files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from latent_diffusion.data.shapes import SPLITS, ShapesDataset, render_scene


def render_folder(root: str | Path, count: int, *, seed: int = 0, resolution: int = 64, split: str = "train",
                  two_object_probability: float = 0.5) -> Path:
    """Write ``count`` training renders (``NNNNNN.png`` + ``NNNNNN.txt``) under ``root``; returns the folder."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(count, seed=seed, split=split, resolution=resolution,
                            two_object_probability=two_object_probability)
    for index in range(count):
        scene, caption, render_seed = dataset.scene(index)
        image = render_scene(scene, resolution, seed=render_seed, jitter=dataset.jitter)
        Image.fromarray(image).save(folder / f"{index:06d}.png", compress_level=1)
        (folder / f"{index:06d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the shapes world to an image folder for `ldm train`.")
    parser.add_argument("root", help="output folder")
    parser.add_argument("--count", type=int, default=20000, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--split", default="train", choices=SPLITS, help="colour-shape pairs to draw from")
    parser.add_argument("--two-object-probability", type=float, default=0.5, help="share of two-object scenes")
    args = parser.parse_args(argv)
    print(render_folder(args.root, args.count, seed=args.seed, resolution=args.resolution, split=args.split,
                        two_object_probability=args.two_object_probability))


if __name__ == "__main__":
    main()
