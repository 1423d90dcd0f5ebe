"""The geometric judge: it reads rendered scenes right, its expectations match the renderer, and
`ldm eval-shapes --judge both` reports how often it agrees with the classifier."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from latent_diffusion.data.shapes import (
    BACKGROUNDS, COLOUR_RGB, COLOURS, NO_JITTER, SHAPES, SIZES, RenderJitter, Scene, ShapeObject, image_to_tensor,
    render_scene, sample_scene,
)
from latent_diffusion.evaluation.shapes_classifier import SceneReading
from latent_diffusion.evaluation.shapes_eval import (
    SPOKEN_GROUPS,
    EvalPrompt, evaluate_generator, fixed_prompt_set, format_report, judge_agreement, rendering_generator,
    score_reading,
)
from latent_diffusion.evaluation.shapes_geometry import (
    _regions, measure_region, read_scene_geometrically, shape_geometry,
)


def test_rendered_scenes_are_read_right():
    rng = np.random.default_rng(11)
    hits: dict[str, list[bool]] = {}
    for index in range(300):
        scene = sample_scene(rng, "all", two_object_probability=0.5)
        image = render_scene(scene, 64, seed=index, jitter=RenderJitter())
        for name, values in score_reading(read_scene_geometrically(image), scene).items():
            hits.setdefault(name, []).extend(values)
    rates = {name: float(np.mean(values)) for name, values in hits.items()}
    assert min(rates.values()) >= 0.99, rates  # the stated bar: drawn shapes called right at least 99%


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_every_shape_colour_and_size_is_read_exactly(background):
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                scene = Scene.single(shape, colour, size, "center", background)
                reading = read_scene_geometrically(render_scene(scene, 64, jitter=NO_JITTER))
                assert reading == SceneReading(scene.objects, background), (scene, reading)


@pytest.mark.parametrize("shape", SHAPES)
def test_expected_geometry_matches_a_fine_render(shape):
    # Rendered large, pixels barely matter: what is measured is what the outline has.
    image = render_scene(Scene.single(shape, "blue", "large", "center"), 512)
    (region,) = _regions(np.linalg.norm(image.astype(float) - 255, axis=2) > 45)
    measured, expected = measure_region(image, region), shape_geometry()[shape]
    assert measured.fill == pytest.approx(expected.fill, abs=0.02)
    assert measured.solidity == pytest.approx(expected.solidity, abs=0.02)
    assert measured.corners == expected.corners


def _with_ragged_fringe(coverage: np.ndarray) -> np.ndarray:
    """A blue object of ``coverage`` (0-1) on black, with a ring of pixels around it alternately 10%
    and 30% covered: soft edges that a threshold cuts into a jagged outline."""
    height, width = coverage.shape
    padded = np.pad(coverage >= 1, 1)
    ring = np.max([padded[r:r + height, c:c + width] for r in range(3) for c in range(3)], axis=0) & (coverage < 1)
    rows, columns = np.nonzero(ring)
    coverage = coverage.copy()
    coverage[rows, columns] = np.where((rows + columns) % 2 == 0, 0.1, 0.3)
    return (coverage[..., None] * np.asarray(COLOUR_RGB["blue"], dtype=np.float64)).round().astype(np.uint8)


def test_partly_covered_edge_pixels_do_not_change_a_shape():
    # An autoencoder's edges are uneven: the judge measures fill on partial pixels, so a small square
    # with a ragged fringe stays a square, and a circle of the same size with it stays a circle.
    square = np.zeros((64, 64))
    square[27:37, 27:37] = 1.0
    rows, columns = np.mgrid[:64, :64]
    circle = ((rows - 31.5) ** 2 + (columns - 31.5) ** 2 <= 5.6 ** 2).astype(np.float64)
    for shape, coverage in (("square", square), ("circle", circle)):
        (found,) = read_scene_geometrically(_with_ragged_fringe(coverage)).objects
        assert found.shape == shape and found.colour == "blue"


def test_specks_are_not_objects_and_positions_follow_the_pixels():
    scene = Scene.pair(ShapeObject("star", "red", "small", "left"), "above", ShapeObject("square", "blue", "large", "left"))
    image = render_scene(scene, 64)
    rng = np.random.default_rng(0)
    for row, column in rng.integers(0, 64, size=(6, 2)):
        image[row, column] = (0, 200, 0)  # single stray pixels
    reading = read_scene_geometrically(image)
    assert reading.count == 2 and [obj.position for obj in reading.objects] == ["top", "bottom"]
    assert score_reading(reading, scene)["scene"] == [True]


def test_a_blank_image_has_no_objects():
    reading = read_scene_geometrically(np.full((64, 64, 3), 128, np.uint8))
    assert reading == SceneReading((), "gray")


def test_agreement_counts_verdicts_not_readings():
    scene = Scene.single("circle", "red", "large", "left")
    prompt = EvalPrompt("a large red circle on the left", scene, "single_seen")
    right = SceneReading(scene.objects, "white")
    wrong_shape = SceneReading((ShapeObject("star", "red", "large", "left"),), "white")
    other_wrong_shape = SceneReading((ShapeObject("square", "red", "large", "left"),), "white")
    assert judge_agreement([right], [right], [prompt])["all"] == 1.0
    # Both call the shape wrong (whatever they saw instead): they agree on every verdict.
    assert judge_agreement([wrong_shape], [other_wrong_shape], [prompt])["all"] == 1.0
    split = judge_agreement([right, right], [right, wrong_shape], [prompt, prompt])
    assert split["shape"] == 0.5 and split["scene"] == 0.5 and split["colour"] == 1.0


@pytest.fixture(scope="module")
def classifier():
    from latent_diffusion.evaluation.shapes_classifier import load_shapes_classifier

    return load_shapes_classifier()


def test_both_judges_score_the_renderer_perfectly_and_agree(classifier):
    prompts = fixed_prompt_set(6, 6, 6)
    evaluation = evaluate_generator(rendering_generator(seed=3), prompts=prompts, classifier=classifier, judge="both")
    assert evaluation.judge == "both" and evaluation.agreement["all"] >= 0.99
    for accuracy in (evaluation.accuracy, evaluation.geometric_accuracy):
        assert min(min(row.values()) for row in accuracy.values()) >= 0.9
    report = format_report(evaluation)
    assert "judged by: geometry" in report and "judges agree on" in report
    alone = evaluate_generator(rendering_generator(seed=3), prompts=prompts, classifier=classifier, judge="geometric")
    assert alone.accuracy == evaluation.geometric_accuracy and alone.agreement is None
    with pytest.raises(ValueError, match="judge must be one of"):
        evaluate_generator(rendering_generator(), prompts=prompts, classifier=classifier, judge="oracle")


def test_judges_agree_that_a_wrong_image_is_wrong(classifier):
    prompts = [p for p in fixed_prompt_set(4, 4, 4) if p.scene.objects[0].shape != "star"]
    star = Scene.single("star", "purple", "small", "center", "black")
    evaluation = evaluate_generator(lambda caption: image_to_tensor(render_scene(star, 64)), prompts=prompts,
                                    classifier=classifier, judge="both")
    assert evaluation.geometric_accuracy["single_seen"]["scene"] == 0.0
    assert evaluation.accuracy["single_seen"]["scene"] == 0.0
    assert evaluation.agreement["scene"] == 1.0


def test_cli_eval_shapes_reports_both_judges_and_their_agreement():
    result = subprocess.run(
        [sys.executable, "-m", "latent_diffusion.cli", "eval-shapes", "--renderer", "--judge", "both",
         "--prompts-per-group", "2", "--spoken-prompts", "2", "--json"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["judge"] == "both" and 0 < report["agreement"]["all"] <= 1
    assert set(report["geometric_accuracy"]) == {"single_seen", "two_seen", "held_out", *SPOKEN_GROUPS}
    # The renderer draws what every caption states, three-object scenes included: geometry sees that.
    assert all(row["scene"] == 1.0 for row in report["geometric_accuracy"].values())


def test_eval_shapes_round_trip_scores_renders_through_the_first_stage(capsys):
    from latent_diffusion import cli
    from latent_diffusion.pipelines.commands import _through_first_stage
    from latent_diffusion.pipelines.common import Pipeline

    render = rendering_generator(seed=4)
    round_trip = _through_first_stage(Pipeline.from_checkpoint(None, progress=False), rendering_generator(seed=4))
    caption = "a small red star left of a blue square on a gray background"
    original, decoded = render(caption), round_trip(caption)
    error = (decoded - original).square().mean().item() / 4  # images in [-1, 1]
    assert 0 < error < 10 ** -3.5  # changed by the autoencoder, and closer than 35 dB PSNR
    assert cli.main(["eval-shapes", "--round-trip", "--judge", "both", "--prompts-per-group", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["single_seen"]["scene"] == 1.0
    assert 35 < report["round_trip_psnr"] < 80  # changed by the autoencoder, and close
