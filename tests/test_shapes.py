"""The shapes world: scene specs, renderer, caption grammar, held-out pairs and the dataset."""
import numpy as np
import pytest
import torch

from latent_diffusion.data.shapes import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    HELD_OUT_PAIRS,
    PHRASINGS,
    CaptionError,
    NO_JITTER,
    RenderJitter,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption_for,
    captions_for,
    collate_samples,
    downsample,
    image_to_tensor,
    parse_caption,
    render_scene,
    sample_scene,
    tensor_to_image,
)


def _random_scenes(count, seed=0, split="all"):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(count)]


def test_every_phrasing_parses_back_to_its_scene():
    scenes = _random_scenes(600)
    assert {len(scene.objects) for scene in scenes} == {1, 2}
    for scene in scenes:
        for phrasing in PHRASINGS:
            caption = caption_for(scene, phrasing)
            assert parse_caption(caption) == scene, caption


def test_examples_from_the_issue_parse():
    scene = parse_caption("a large red circle on the left")
    assert scene == Scene.single("circle", "red", "large", "left", "white")
    scene = parse_caption("a small blue triangle above a large yellow square on a black background")
    assert scene.relation == "above" and scene.background == "black"
    assert [(o.shape, o.colour, o.size, o.position) for o in scene.objects] == [
        ("triangle", "blue", "small", "top"),
        ("square", "yellow", "large", "bottom"),
    ]
    assert parse_caption("Large red circle, left, grey background.") == Scene.single("circle", "red", "large", "left", "gray")


def test_captions_of_a_scene_are_distinct_and_several():
    scene = Scene.single("star", "blue", "small", "top", "black")
    captions = captions_for(scene)
    assert len(captions) == len(set(captions)) >= 3


def test_a_caption_may_leave_out_the_default_size_and_background():
    # The README's first prompt: no sizes, no background.
    scene = parse_caption("a red circle left of a blue square")
    assert scene == Scene.pair(ShapeObject("circle", "red", "large", "left"), "left of",
                               ShapeObject("square", "blue", "large", "right"), "white")
    mixed = parse_caption("a small blue triangle above a yellow square on a black background")
    assert [obj.size for obj in mixed.objects] == ["small", "large"] and mixed.background == "black"
    short = caption_for(Scene.single("circle", "red", "large", "left"), "short")
    assert short == "a red circle on the left"
    assert caption_for(Scene.single("circle", "red", "small", "left", "gray"), "short") == (
        "a small red circle on the left on a gray background")


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a pink circle on the left",
        "a large red hexagon on the left",
        "a large red circle",
        "a large red circle on the left on a purple background",
        "a large red circle left of",
        "on the left a large red circle",
        "a large red circle on the left of a small blue star",
        "large red circle, left",
    ],
)
def test_captions_outside_the_grammar_are_rejected(caption):
    with pytest.raises(CaptionError, match="outside the shapes grammar"):
        parse_caption(caption)


def test_parse_error_names_unknown_words():
    with pytest.raises(CaptionError, match="'pink'"):
        parse_caption("a large pink circle on the left")


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeObject("circle", "pink", "large", "left")
    with pytest.raises(ValueError, match="relation"):
        Scene((ShapeObject("circle", "red", "large", "left"), ShapeObject("star", "blue", "small", "right")), "white", "above")
    with pytest.raises(ValueError, match="one or two objects"):
        Scene((), "white")
    with pytest.raises(ValueError, match="jitter"):
        RenderJitter(position=0.2)


def test_relation_fixes_positions():
    first = ShapeObject("circle", "red", "large", "center")
    second = ShapeObject("star", "blue", "small", "center")
    scene = Scene.pair(first, "below", second)
    assert [obj.position for obj in scene.objects] == ["bottom", "top"]


def test_renderer_is_deterministic_in_its_seed():
    scene = Scene.pair(ShapeObject("star", "red", "large", "left"), "left of", ShapeObject("triangle", "blue", "small", "right"))
    jitter = RenderJitter()
    first = render_scene(scene, 64, seed=7, jitter=jitter)
    assert np.array_equal(first, render_scene(scene, 64, seed=7, jitter=jitter))
    assert not np.array_equal(first, render_scene(scene, 64, seed=8, jitter=jitter))


def test_dataset_is_deterministic_in_seed_and_index():
    dataset = ShapesDataset(50, seed=3)
    again = ShapesDataset(50, seed=3)
    other = ShapesDataset(50, seed=4)
    for index in (0, 17, 49):
        sample = dataset[index]
        assert torch.equal(sample.image, again[index].image) and sample.caption == again[index].caption
    assert any(not torch.equal(dataset[i].image, other[i].image) for i in range(5))
    sample = dataset[0]
    assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
    assert -1.0 <= sample.image.min() and sample.image.max() <= 1.0
    assert parse_caption(sample.caption) == sample.scene
    with pytest.raises(IndexError):
        dataset[50]


def test_training_sampler_never_produces_held_out_pairs():
    dataset = ShapesDataset(4000, seed=11, split="train")
    pairs = {(obj.colour, obj.shape) for index in range(len(dataset)) for obj in dataset.scene(index)[0].objects}
    assert not pairs & HELD_OUT_PAIRS
    assert len(pairs) == 24 - len(HELD_OUT_PAIRS)
    held_out = {(o.colour, o.shape) for scene in _random_scenes(300, split="held_out") for o in scene.objects}
    assert held_out == set(HELD_OUT_PAIRS)


def test_edges_are_anti_aliased():
    scene = Scene.single("circle", "red", "large", "center", "black")
    image = render_scene(scene, 64, jitter=NO_JITTER)
    red = image[..., 0].astype(int)
    background, fill = BACKGROUND_RGB["black"][0], COLOUR_RGB["red"][0]
    intermediate = (red > background + 5) & (red < fill - 5)
    # A circle of radius ~11 px has a rim of ~70 partly covered pixels; pure aliasing would have none.
    assert intermediate.sum() > 30
    # Interior and far background are flat.
    assert red[32, 32] == fill and red[2, 2] == background


def test_objects_land_where_the_spec_says():
    for position, (row, col) in {"left": (32, 16), "right": (32, 48), "top": (16, 32), "bottom": (48, 32), "center": (32, 32)}.items():
        image = render_scene(Scene.single("square", "blue", "small", position, "white"), 64, jitter=NO_JITTER)
        assert tuple(image[row, col]) == COLOUR_RGB["blue"], position


def test_render_is_fast_enough():
    import time

    scenes = _random_scenes(200, seed=5)
    started = time.perf_counter()
    for index, scene in enumerate(scenes):
        render_scene(scene, 64, seed=index, jitter=RenderJitter())
    # Thousands per second when idle; a generous bound keeps this robust on a loaded machine.
    assert time.perf_counter() - started < 2.0


def test_tensor_conversions_round_trip_and_downsample_averages():
    image = render_scene(Scene.single("star", "yellow", "large", "center", "gray"), 64, jitter=NO_JITTER)
    tensor = image_to_tensor(image)
    assert np.array_equal(tensor_to_image(tensor), image)
    small = downsample(tensor, 16)
    assert small.shape == (3, 16, 16)
    assert torch.allclose(small[:, 0, 0], tensor[:, :4, :4].mean(dim=(1, 2)))
    assert downsample(tensor[None].repeat(2, 1, 1, 1), 16).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        downsample(tensor, 24)


def test_collate_stacks_images_and_keeps_captions():
    dataset = ShapesDataset(4, seed=0)
    batch = collate_samples([dataset[i] for i in range(4)])
    assert batch.image.shape == (4, 3, 64, 64)
    assert len(batch.caption) == len(batch.scene) == 4
