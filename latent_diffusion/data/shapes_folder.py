"""Render the shapes world to an image folder that ``ldm train`` reads (PNG + same-name .txt caption).

    python -m latent_diffusion.data.shapes_folder data/shapes --count 20000 --seed 0

The folder is a pure function of its options: re-running writes the same files. The built-in
model's training set adds three-object scenes, scenes of alike objects and captions as people write
them (MODEL_CARD.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from latent_diffusion.data.shapes import PHRASINGS, SPLITS, ShapesDataset, render_scene


def render_folder(root: str | Path, count: int, *, seed: int = 0, resolution: int = 64, split: str = "train",
                  two_object_probability: float = 0.5, three_object_probability: float = 0.0,
                  same_kind_probability: float = 0.0, spoken_share: float = 0.0,
                  phrasings: tuple[str, ...] = PHRASINGS, lists_in_reading_order: bool = False,
                  beside_share: float | None = None) -> Path:
    """Write ``count`` training renders (``NNNNNN.png`` + ``NNNNNN.txt``) under ``root``; returns the folder."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(count, seed=seed, split=split, resolution=resolution,
                            two_object_probability=two_object_probability, phrasings=phrasings,
                            three_object_probability=three_object_probability,
                            same_kind_probability=same_kind_probability, spoken_share=spoken_share,
                            lists_in_reading_order=lists_in_reading_order, beside_share=beside_share)
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
    parser.add_argument("--two-object-probability", type=float, default=0.5,
                        help="share of two-object scenes among those that are not three-object ones")
    parser.add_argument("--three-object-probability", type=float, default=0.0, help="share of three-object scenes")
    parser.add_argument("--same-kind-probability", type=float, default=0.0,
                        help="share of two- and three-object scenes whose objects are alike")
    parser.add_argument("--spoken-share", type=float, default=0.0,
                        help="share of captions written as people write them (three-object scenes: all)")
    parser.add_argument("--phrasings", nargs="+", default=list(PHRASINGS), choices=PHRASINGS,
                        help="the grammar's phrasings for the other captions")
    parser.add_argument("--lists-in-reading-order", action="store_true",
                        help='captions as people write them name the objects of "X and Y" as one reads the image '
                             "(the upper or left one first) rather than in a random order")
    parser.add_argument("--beside-share", type=float, default=None,
                        help='the chance that a caption as people write it calls a side-by-side pair "X beside Y" '
                             "or \"X next to Y\" (default: a third)")
    args = parser.parse_args(argv)
    try:
        folder = render_folder(args.root, args.count, seed=args.seed, resolution=args.resolution, split=args.split,
                               two_object_probability=args.two_object_probability,
                               three_object_probability=args.three_object_probability,
                               same_kind_probability=args.same_kind_probability, spoken_share=args.spoken_share,
                               phrasings=tuple(args.phrasings),
                               lists_in_reading_order=args.lists_in_reading_order,
                               beside_share=args.beside_share)
    except ValueError as error:
        parser.error(str(error))
    print(folder)


if __name__ == "__main__":
    main()
