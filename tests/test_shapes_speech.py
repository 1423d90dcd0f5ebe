"""Captions as people write them (opt-in training data) and the scoring of what they state."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from latent_diffusion.data.shapes import (
    PHRASINGS, CaptionError, RenderJitter, Scene, ShapeObject, ShapesDataset, caption_for, render_scene,
    sample_scene,
)
from latent_diffusion.data.shapes_speech import (
    BESIDE, Description, ObjectDescription, describe, read_description, scene_for, score_description,
)
from latent_diffusion.evaluation.shapes_eval import SPOKEN_GROUPS, spoken_prompt_set
from latent_diffusion.evaluation.shapes_geometry import read_scene_geometrically


def test_the_default_dataset_is_bit_for_bit_what_it_was():
    # The digest was taken with the code before the opt-in options existed (main at 3728c16).
    digest = hashlib.sha256()
    for seed, split, two in ((0, "train", 0.5), (3, "all", 0.7)):
        dataset = ShapesDataset(400, seed=seed, split=split, two_object_probability=two)
        for index in range(len(dataset)):
            scene, caption, render_seed = dataset.scene(index)
            digest.update(f"{scene!r}|{caption}|{render_seed}\n".encode())
        for index in range(0, 400, 50):
            digest.update(dataset[index].image.numpy().tobytes())
    assert digest.hexdigest() == "2ddc03e958bb49328ca29413d3f4addc8508bd254ccb8e6b947c4fd8270d2c46"


def test_every_written_caption_reads_back_to_what_its_scene_shows():
    rng = np.random.default_rng(5)
    counts = set()
    for _ in range(1500):
        scene = sample_scene(rng, "all", two_object_probability=0.5, three_object_probability=0.3)
        caption = describe(scene, rng)
        hits = score_description(scene.objects, scene.background, read_description(caption))
        assert all(all(values) for values in hits.values()), (caption, hits)
        counts.add(len(scene.objects))
    assert counts == {1, 2, 3}


def test_lists_in_reading_order_name_the_upper_or_left_object_first():
    options = dict(seed=4, two_object_probability=1.0, spoken_share=1.0, same_kind_probability=0.0)
    scene_order = ShapesDataset(600, **options)
    reading_order = ShapesDataset(600, lists_in_reading_order=True, **options)
    swapped = 0
    for index in range(600):
        scene, caption, render_seed = reading_order.scene(index)
        assert scene_order.scene(index)[0] == scene and scene_order.scene(index)[2] == render_seed
        before = scene_order.scene(index)[1]
        description = read_description(caption)
        if description.relation is not None or any(obj.position for obj in description.objects):
            assert caption == before  # only "X and Y" captions change
            continue
        first = min(scene.objects, key=lambda obj: ("top", "left", "right", "bottom").index(obj.position))
        assert (description.objects[0].shape, description.objects[0].colour) == (first.shape, first.colour), caption
        words = sorted(caption.lower().strip(".").split())
        assert words == sorted(before.lower().strip(".").split())  # the same words, swapped
        swapped += caption != before
    assert swapped > 30


def test_beside_share_sets_how_often_a_level_pair_is_written_beside():
    options = dict(seed=6, two_object_probability=1.0, spoken_share=1.0, same_kind_probability=0.0)

    def beside_share_of_level_pairs(dataset):
        level = [dataset.scene(index) for index in range(600)]
        level = [(scene, caption) for scene, caption, _ in level if scene.relation in ("left of", "right of")]
        return np.mean([read_description(caption).relation == BESIDE for _, caption in level])

    default, boosted = ShapesDataset(600, **options), ShapesDataset(600, beside_share=0.8, **options)
    assert all(default.scene(i)[0] == boosted.scene(i)[0] for i in range(600))  # the same scenes
    assert 0.2 < beside_share_of_level_pairs(default) < 0.45
    assert 0.7 < beside_share_of_level_pairs(boosted) < 0.9
    vertical = [boosted.scene(i)[1] for i in range(600) if boosted.scene(i)[0].relation in ("above", "below")]
    assert not any(read_description(caption).relation == BESIDE for caption in vertical)
    with pytest.raises(ValueError, match="beside_share"):
        ShapesDataset(10, beside_share=1.5, **options)


def test_the_grammar_s_own_captions_read_in_full():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_scene(rng, "all")
        for phrasing in PHRASINGS:
            description = read_description(caption_for(scene, phrasing))
            assert score_description(scene.objects, scene.background, description)["scene"] == [True]
    full = read_description("a small red circle left of a large blue star on a black background")
    assert full.relation == "left of" and full.background == "black"
    assert full.objects == (ObjectDescription("circle", "red", "small"), ObjectDescription("star", "blue", "large"))


@pytest.mark.parametrize("caption,expected", [
    ("a red circle", Description((ObjectDescription("circle", "red"),))),
    ("three blue squares", Description((ObjectDescription("square", "blue"),) * 3)),
    ("A pair of big green stars!", Description((ObjectDescription("star", "green", "large"),) * 2)),
    ("a red circle next to a blue square.", Description(
        (ObjectDescription("circle", "red"), ObjectDescription("square", "blue")), relation=BESIDE)),
    ("A tiny violet disc under an orange box, on a grey background", Description(
        (ObjectDescription("circle", "purple", "small"), ObjectDescription("square", "orange")), "gray", "below")),
    ("a red circle on top of a blue star", Description(
        (ObjectDescription("circle", "red"), ObjectDescription("star", "blue")), relation="above")),
    ("a red circle, a blue square and a green star in a column", Description(
        (ObjectDescription("circle", "red"), ObjectDescription("square", "blue"), ObjectDescription("star", "green")),
        relation="in a column")),
    ("a yellow triangle in the middle", Description((ObjectDescription("triangle", "yellow", None, "center"),))),
])
def test_captions_read_to_what_they_state(caption, expected):
    assert read_description(caption) == expected


@pytest.mark.parametrize("caption,message", [
    ("a photo of a cat", "cannot read"),
    ("two red circle", "a count of 2 with one noun"),
    ("a red circles", "a count of 1 with a plural noun"),
    ("three red circles and a blue star", "4 objects"),
    ("a red circle in a row", "needs three objects"),
])
def test_what_cannot_be_read_is_a_caption_error(caption, message):
    with pytest.raises(CaptionError, match=message):
        read_description(caption)


def test_scoring_checks_only_what_the_caption_states():
    red_left = ShapeObject("circle", "red", "small", "left")
    blue_right = ShapeObject("square", "blue", "large", "right")
    # "a red circle" is right anywhere and at any size, but not twice.
    assert score_description((red_left,), "black", read_description("a red circle"))["scene"] == [True]
    two = score_description((red_left, ShapeObject("circle", "red", "small", "right")), "white",
                            read_description("a red circle"))
    assert two["count"] == [False] and two["scene"] == [False]
    # Counts: one square where three are asked is wrong.
    hits = score_description((ShapeObject("square", "blue", "large", "center"),), "white",
                             read_description("three blue squares"))
    assert hits["count"] == [False] and hits["scene"] == [False]
    # "next to" holds in either order; "above" does not hold side by side.
    beside = read_description("a blue square beside a red circle")
    assert score_description((red_left, blue_right), "white", beside)["scene"] == [True]
    above = score_description((red_left, blue_right), "white", read_description("a red circle above a blue square"))
    assert above["position"] == [False, False] and above["shape"] == [True, True]


def test_opt_in_dataset_options_draw_three_objects_and_spoken_captions():
    dataset = ShapesDataset(300, seed=2, split="all", three_object_probability=0.3, spoken_share=0.5)
    items = [dataset.scene(index) for index in range(len(dataset))]
    assert sum(len(scene.objects) == 3 for scene, _, _ in items) > 50
    grammar = 0
    for scene, caption, _ in items:
        assert score_description(scene.objects, scene.background, read_description(caption))["scene"] == [True]
        try:
            grammar += len(scene.objects) < 3 and caption in [caption_for(scene, p) for p in PHRASINGS]
        except ValueError:
            pass
    assert 50 < grammar < 250  # both kinds of caption are drawn
    with pytest.raises(ValueError, match="spoken_share"):
        ShapesDataset(10, three_object_probability=0.2)


def test_three_object_scenes_are_small_apart_and_read_by_the_geometric_judge():
    rng = np.random.default_rng(3)
    for index in range(60):
        scene = sample_scene(rng, "all", three_object_probability=1.0)
        image = render_scene(scene, 64, seed=index, jitter=RenderJitter())
        reading = read_scene_geometrically(image)
        assert score_description(reading.objects, reading.background,
                                 read_description(describe(scene, rng)))["scene"] == [True]
    objects = tuple(ShapeObject("circle", "red", "large", p) for p in ("left", "center", "right"))
    with pytest.raises(ValueError, match="small"):
        Scene(objects, "white", "in a row")


def test_scene_for_fills_in_what_is_unsaid():
    scene = scene_for(read_description("two red circles"))
    assert [obj.position for obj in scene.objects] == ["left", "right"] and scene.relation == "left of"
    assert scene_for(read_description("a red circle")).objects[0].size == "large"
    with pytest.raises(CaptionError, match="no scene"):
        scene_for(read_description("two red circles on the left"))


def test_spoken_prompts_carry_what_they_state():
    prompts = spoken_prompt_set(5)
    assert [prompt.group for prompt in prompts] == [group for group in SPOKEN_GROUPS for _ in range(5)]
    for prompt in prompts:
        assert read_description(prompt.caption) == prompt.description
        objects = prompt.description.objects
        assert len(objects) == {"spoken_one": 1, "spoken_two": 2, "spoken_three": 3}.get(prompt.group, len(objects))
        if prompt.group == "counts":
            assert len(objects) > 1 and len(set(objects)) == 1, prompt
        if prompt.group == "unplaced":
            assert prompt.description.relation is None and all(obj.position is None for obj in objects), prompt
        assert prompt.scene.has_held_out_pair == (prompt.group == "held_out_spoken"), prompt
