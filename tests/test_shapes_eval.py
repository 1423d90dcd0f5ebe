"""The shipped shapes classifier and the generator evaluation built on it."""
import json

import numpy as np
import pytest
import torch

from latent_diffusion.data.shapes import HELD_OUT_PAIRS, RenderJitter, Scene, ShapeObject, image_to_tensor, render_scene
from latent_diffusion.evaluation.shapes_classifier import (
    FEATURE_DIM,
    SceneReading,
    ShapesClassifier,
    evaluate_classifier,
    extract_features,
    load_shapes_classifier,
    read_scenes,
    render_batch,
    scene_targets,
)
from latent_diffusion.evaluation.shapes_eval import (
    GROUPS,
    evaluate_generator,
    fixed_prompt_set,
    format_report,
    read_prompt_file,
    rendering_generator,
    score_images,
    score_reading,
)


@pytest.fixture(scope="module")
def classifier():
    return load_shapes_classifier()


def test_shipped_classifier_reads_fresh_renders(classifier):
    # Seed 987 is not the training stream; 500 images, one to three objects (SCENE_MIX), all colour-shape pairs.
    accuracy = evaluate_classifier(classifier, count=500, seed=987)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_shipped_classifier_reads_held_out_pairs_and_other_resolutions(classifier):
    rng = np.random.default_rng(5)
    images, scenes = render_batch(rng, 100, split="held_out", jitter=RenderJitter())
    readings = read_scenes(classifier, images)
    # Readings list objects in POSITIONS order, scenes in caption order.
    assert sum(set(reading.objects) == set(scene.objects) for reading, scene in zip(readings, scenes)) >= 99
    # A 128 px render is resized to the classifier's 64 px input.
    scene = Scene.single("star", "purple", "large", "right", "gray")
    reading = read_scenes(classifier, image_to_tensor(render_scene(scene, 128))[None])[0]
    assert reading.objects == scene.objects and reading.background == "gray"


def test_weights_are_small_fp16_and_load_from_meta():
    from safetensors.torch import load_file

    from latent_diffusion.evaluation.shapes_classifier import DEFAULT_WEIGHTS

    weights = load_file(str(DEFAULT_WEIGHTS))
    assert all(value.dtype == torch.float16 for value in weights.values())
    assert DEFAULT_WEIGHTS.stat().st_size < 4_000_000
    assert set(weights) == set(ShapesClassifier().state_dict())


def test_features_have_the_documented_shape(classifier):
    images, _ = render_batch(np.random.default_rng(0), 3)
    assert extract_features(classifier, images).shape == (3, FEATURE_DIM)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        classifier.features(torch.zeros(3, 64, 64))


def test_targets_mark_empty_positions():
    scene = Scene.single("triangle", "orange", "small", "top", "black")
    targets = scene_targets([scene])
    assert targets.shape.tolist() == [[0, 0, 3, 0, 0]]  # POSITIONS order: left right top bottom center
    assert targets.colour[0, 2].item() == 5 and targets.colour[0, 0].item() == -100


def test_score_reading_matches_objects_in_any_order():
    scene = Scene.pair(ShapeObject("star", "red", "large", "left"), "left of", ShapeObject("circle", "blue", "small", "right"))
    perfect = SceneReading(tuple(reversed(scene.objects)), "white")
    assert all(all(hits) for hits in score_reading(perfect, scene).values())
    wrong_colour = SceneReading((scene.objects[0], ShapeObject("circle", "green", "small", "right")), "black")
    hits = score_reading(wrong_colour, scene)
    assert hits["colour"] == [True, False] and hits["shape"] == [True, True]
    assert hits["background"] == [False] and hits["scene"] == [False] and hits["count"] == [True]
    empty = score_reading(SceneReading((), "white"), scene)
    assert empty["shape"] == [False, False] and empty["count"] == [False]


def test_fixed_prompt_set_is_stable_and_separates_held_out_pairs():
    prompts = fixed_prompt_set()
    assert prompts == fixed_prompt_set()
    assert {prompt.group for prompt in prompts} == set(GROUPS)
    for prompt in prompts:
        assert prompt.scene.has_held_out_pair == (prompt.group == "held_out")
        assert len(prompt.scene.objects) == (2 if prompt.group == "two_seen" else 1)
    held_out = {(o.colour, o.shape) for p in prompts if p.group == "held_out" for o in p.scene.objects}
    assert held_out == set(HELD_OUT_PAIRS)


def test_rendering_generator_scores_near_perfect_and_a_bad_one_does_not(classifier):
    prompts = fixed_prompt_set(single_seen=8, two_seen=8, held_out=4)
    perfect = evaluate_generator(rendering_generator(seed=1), prompts=prompts, classifier=classifier)
    for group in GROUPS:
        assert min(perfect.accuracy[group].values()) >= 0.9, (group, perfect.accuracy[group])
    constant_scene = Scene.single("square", "blue", "small", "center", "white")
    constant = evaluate_generator(lambda caption: render_scene(constant_scene, 64), prompts=prompts, classifier=classifier)
    assert constant.accuracy["two_seen"]["count"] == 0.0
    assert constant.frechet_distance > 5 * perfect.frechet_distance
    report = format_report(perfect)
    assert "held_out" in report and "Fréchet" in report


def test_score_images_rejects_mixed_sizes(classifier):
    prompts = fixed_prompt_set(single_seen=2, two_seen=0, held_out=0)
    with pytest.raises(ValueError, match="differ in size"):
        score_images([torch.zeros(3, 64, 64), torch.zeros(3, 32, 32)], prompts, classifier)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        score_images([torch.zeros(64, 64), torch.zeros(64, 64)], prompts, classifier)


def test_prompt_file_names_the_scene_a_new_word_asks_for(classifier, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a new word for red\n\na crimson circle on the left | a red circle on the left\n"
                    "a small blue square at the top\n", encoding="utf-8")
    prompts = read_prompt_file(path)
    assert [p.caption for p in prompts] == ["a crimson circle on the left", "a small blue square at the top"]
    assert prompts[0].scene == Scene.single("circle", "red", "large", "left")
    assert prompts[1].scene == Scene.single("square", "blue", "small", "top")
    red_circle = Scene.single("circle", "red", "large", "left")
    evaluation = evaluate_generator(lambda caption: render_scene(red_circle, 64), prompts=prompts, classifier=classifier)
    assert evaluation.accuracy["prompts"]["colour"] == 0.5 and evaluation.accuracy["prompts"]["scene"] == 0.5
    assert "prompts" in format_report(evaluation)


def test_prompt_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on the left\na crimson circle on the left\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts.txt, line 2: .*'crimson'"):
        read_prompt_file(path)
    path.write_bytes(b"\xff\xfe a red circle")
    with pytest.raises(ValueError, match="prompts.txt is not UTF-8"):
        read_prompt_file(path)
    path.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompts.txt holds no prompts"):
        read_prompt_file(path)


def test_eval_shapes_scores_any_shapes_file_at_the_built_in_guidance(tmp_path):
    # A trained file given with -c is a shapes-world model too: SD's 7.5 would oversaturate it.
    from latent_diffusion.cli import _build_parser
    from latent_diffusion.pipelines.commands import _guidance

    for argv in (["eval-shapes"], ["eval-shapes", "-c", str(tmp_path / "model.safetensors")]):
        assert _guidance(_build_parser().parse_args(argv)) == 2.0  # what `ldm txt2img` uses with it
    assert _guidance(_build_parser().parse_args(["eval-shapes", "--cfg-scale", "5"])) == 5.0
    assert _guidance(_build_parser().parse_args(["txt2img", "a red circle"])) == 2.0
    assert _guidance(_build_parser().parse_args(["img2img", "a red circle", "--init-image", "x.png"])) == 3.0


def test_eval_shapes_lists_and_saves_the_images_a_judge_failed(tmp_path, capsys):
    from PIL import Image

    from latent_diffusion import cli

    path = tmp_path / "prompts.txt"
    # The renderer draws each line's prompt; the second is scored against another scene, so it fails.
    path.write_text("a red circle on the left\na blue square at the top | a green star at the bottom\n", encoding="utf-8")
    folder = tmp_path / "failed"
    argv = ["eval-shapes", "--renderer", "--prompts", str(path), "--judge", "both", "--show-failures",
            "--save-failures", str(folder)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 of 2 images failed by a judge" in out
    assert "[0] prompts: 'a blue square at the top' failed by classifier and geometric" in out
    assert "classifier read: large blue square at top on white" in out, out
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "failures.txt"]
    assert Image.open(folder / "000.png").size == (64, 64)
    assert "a blue square at the top" in (folder / "failures.txt").read_text()
    assert cli.main(argv) == 2  # an earlier run's failures are not written over
    assert "holds an earlier run's failures" in capsys.readouterr().err
    assert cli.main(["eval-shapes", "--renderer", "--prompts", str(path), "--show-failures", "--json"]) == 0
    failures = json.loads(capsys.readouterr().out)["failures"]
    assert [(f["caption"], f["failed_by"]) for f in failures] == [("a blue square at the top", ["classifier"])]
    assert failures[0]["readings"]["classifier"] == "large blue square at top on white"
