"""Training data for a shapes-world ControlNet whose map wins over the prompt's position.

The built-in model's text encoder was trained to say where each object is, so with captions that
always agree with the image, a ControlNet learns to add little where the prompt already places the
object, and a prompt naming another position keeps it there. Here the one-object scenes of a
rendered folder are copied with, for a share of them, the caption's position replaced by another
one: the map (made from the image) is then the only true source of the position, while shape,
colour, size and background still come from the caption.

    python -m latent_diffusion.training.shapes_control_data runs/shapes/images-control runs/shapes/images-control-moved
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

from latent_diffusion.data.shapes import PHRASINGS, POSITIONS, CaptionError, Scene, caption_for, parse_caption


def moved_caption(caption: str, rng: random.Random, share: float) -> str | None:
    """The caption of a one-object scene, with its position replaced by another with probability ``share``
    (in a random phrasing); None for captions of other scenes."""
    try:
        scene = parse_caption(caption)
    except CaptionError:
        return None
    if len(scene.objects) != 1:
        return None
    if rng.random() >= share:
        return caption
    obj = scene.objects[0]
    position = rng.choice([p for p in POSITIONS if p != obj.position])
    return caption_for(Scene((replace(obj, position=position),), scene.background), rng.choice(PHRASINGS))


def write_moved_folder(source: Path, target: Path, share: float, seed: int) -> int:
    """Copy (link where possible) the one-object images of ``source`` with their moved captions; the count."""
    rng = random.Random(seed)
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for text in sorted(source.glob("*.txt")):
        image = text.with_suffix(".png")
        caption = moved_caption(text.read_text().strip(), rng, share) if image.is_file() else None
        if caption is None:
            continue
        try:
            os.link(image, target / image.name)
        except OSError:
            shutil.copyfile(image, target / image.name)
        (target / text.name).write_text(caption)
        count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a folder written by latent_diffusion.data.shapes_folder")
    parser.add_argument("target", type=Path, help="the folder to write")
    parser.add_argument("--share", type=float, default=0.5, help="share of captions whose position is moved")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"{args.source} is not a folder")
    if not 0.0 <= args.share <= 1.0:
        parser.error(f"--share must lie in [0, 1], got {args.share}")
    print(f"{write_moved_folder(args.source, args.target, args.share, args.seed)} images written to {args.target}")


if __name__ == "__main__":
    main()
