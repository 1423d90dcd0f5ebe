"""The moved-caption folder for the shapes ControlNet: positions moved, everything else kept."""
from __future__ import annotations

import random

from latent_diffusion.data.shapes import Scene, ShapeObject, caption_for, parse_caption
from latent_diffusion.training.shapes_control_data import moved_caption, write_moved_folder


def test_a_moved_caption_names_another_position_and_keeps_the_rest():
    rng = random.Random(0)
    scene = Scene.single("star", "red", "small", "left", "gray")
    for _ in range(20):
        moved = parse_caption(moved_caption(caption_for(scene), rng, share=1.0)).objects[0]
        assert moved.position != "left"
        assert (moved.shape, moved.colour, moved.size) == ("star", "red", "small")
    assert moved_caption(caption_for(scene), rng, share=0.0) == caption_for(scene)


def test_only_one_object_scenes_are_kept(tmp_path):
    from PIL import Image

    pair = Scene.pair(ShapeObject("circle", "red", "large", "center"), "left of",
                      ShapeObject("square", "blue", "large", "center"), "white")
    source = tmp_path / "source"
    source.mkdir()
    for name, caption in (("a", caption_for(Scene.single("circle", "red", "large", "top"))),
                          ("b", caption_for(pair)), ("c", "not a caption of the shapes world")):
        Image.new("RGB", (8, 8)).save(source / f"{name}.png")
        (source / f"{name}.txt").write_text(caption)
    assert write_moved_folder(source, tmp_path / "target", share=1.0, seed=0) == 1
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == ["a.png", "a.txt"]
    assert parse_caption((tmp_path / "target" / "a.txt").read_text()).objects[0].position != "top"
