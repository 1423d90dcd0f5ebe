"""``ldm eval-shapes --control``: the cases, the maps and the scoring, checked with the perfect renderer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from latent_diffusion import cli
from latent_diffusion.data.shapes import RenderJitter, image_to_tensor, parse_caption, render_scene
from latent_diffusion.evaluation.shapes_classifier import load_shapes_classifier
from latent_diffusion.evaluation.shapes_control import control_cases, control_map, evaluate_control

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cases_put_the_prompt_elsewhere_with_the_same_object():
    cases = control_cases(30)
    for case in cases:
        asked = parse_caption(case.caption).objects[0]
        drawn = case.map_scene.objects[0]
        assert asked.position == case.prompt_position != case.map_position
        assert (asked.shape, asked.colour, asked.size) == (drawn.shape, drawn.colour, drawn.size)
    assert len({case.map_position for case in cases}) == 5 and len({case.prompt_position for case in cases}) == 5


def test_the_map_is_white_edges_where_the_object_is():
    case = next(c for c in control_cases(20) if c.map_position == "left")
    edges = np.asarray(control_map(case.map_scene, 64)).max(axis=2) > 0
    assert edges.any() and set(np.unique(np.asarray(control_map(case.map_scene, 64)))) <= {0, 255}
    columns = np.nonzero(edges.any(axis=0))[0]
    assert columns.max() < 40  # left of the canvas's centre line and a bit


def _renderer(draw_the_map: bool):
    def generate(caption, control_map_image, index):
        case = cases[index]
        scene = case.map_scene if draw_the_map else parse_caption(caption)
        return image_to_tensor(render_scene(scene, 64, seed=index, jitter=RenderJitter()))

    cases = control_cases(20)
    return generate, cases


@pytest.mark.parametrize("draw_the_map", [True, False])
def test_scores_follow_where_the_object_is_drawn(draw_the_map):
    generate, cases = _renderer(draw_the_map)
    scores = evaluate_control(generate, cases, load_shapes_classifier())
    followed, ignored = ("at_map", "at_prompt") if draw_the_map else ("at_prompt", "at_map")
    assert scores[followed] >= 0.9 and scores[ignored] <= 0.1
    if draw_the_map:
        assert min(scores["only_at_map"], scores["shape_at_map"], scores["colour_at_map"]) >= 0.9
    else:
        assert scores["shape_at_map"] == scores["colour_at_map"] == scores["only_at_map"] == scores["at_map"]


def test_an_image_without_objects_scores_nothing():
    cases = control_cases(5)
    blank = lambda caption, image, index: torch.zeros(3, 64, 64)  # noqa: E731  (a gray canvas)
    scores = evaluate_control(blank, cases, load_shapes_classifier())
    assert all(value == 0.0 for value in scores.values())


@pytest.mark.parametrize("args, message", [
    (["--control", "/no/such/controlnet.safetensors"], "ControlNet not found"),
    (["--control", "{file}", "--renderer"], "--renderer and --control exclude each other"),
    (["--control", "{file}", "--control-cases", "0"], "must be >= 1, got 0"),
    (["--control", "{file}", "--control-weight", "3"], "ControlNet weight must be in [0, 2], got 3"),
    (["--control", "{file}", "--control-mode", "loud"], "unknown ControlNet control mode 'loud'"),
])
def test_bad_control_options_are_one_clear_line(args, message, tmp_path, capsys):
    file = tmp_path / "cn.safetensors"
    file.write_bytes(b"")
    code = cli.main(["eval-shapes", *[a.format(file=file) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err
