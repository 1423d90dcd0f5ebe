"""The built-in shapes-world models: shipped, small, loaded by default, and they draw what is asked."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.data.shapes import image_to_tensor, parse_caption
from latent_diffusion.evaluation.shapes_classifier import load_shapes_classifier, read_scenes
from latent_diffusion.data.shapes_speech import read_description, score_description
from latent_diffusion.evaluation.shapes_eval import read_geometrically
from latent_diffusion.pipelines.commands import BUILTIN_TXT2IMG_GUIDANCE
from latent_diffusion.pipelines.common import ASSETS, Pipeline, default_checkpoint_path
from latent_diffusion.pipelines.png_info import read_png_parameters

# Prompts and seeds checked once against the shipped weights (seed 0, or 1 where seed 0 missed: these
# are cases, the rates are in MODEL_CARD.md); both judges (the classifier and the geometric reading)
# must find what each prompt states. The grammar's phrasings, then captions as
# people write them: no place, counts, lists, three objects, other relation words.
PROMPTS = [
    ("a large red circle in the center", 0),
    ("a small blue square on the left on a black background", 1),
    ("a large yellow star at the top on a gray background", 0),
    ("a large green triangle at the bottom", 0),
    ("a large red star left of a small blue star on a gray background", 0),
    ("a small yellow circle below a small red circle", 0),
    ("a red circle left of a blue square", 0),  # the README's first command
    ("a small purple triangle above a large green star on a black background", 0),
    ("a large purple star on the right", 0),  # a colour-shape pair never seen in training
    ("a red circle", 0),
    ("A blue star.", 0),
    ("two green triangles", 0),
    ("three blue squares", 0),
    ("a yellow triangle next to a purple circle", 0),
    ("a red circle, a blue square and a green star in a row", 0),
    ("a big orange box under a little blue disc on a grey background", 0),
]
STEPS, GUIDANCE = 20, BUILTIN_TXT2IMG_GUIDANCE  # the default, at which these seeds were chosen (version 4)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint(None, progress=False)


@pytest.fixture(scope="module")
def classifier():
    return load_shapes_classifier()


def test_builtin_weights_are_shipped_small_and_half_precision():
    from latent_diffusion.checkpoints.io import read_state_dict

    files = sorted(ASSETS.glob("shapes-*.safetensors"))
    assert default_checkpoint_path().name == "shapes-ldm.safetensors"
    assert sum(path.stat().st_size for path in files) <= 30 * 2**20
    for path in files:
        tensors = read_state_dict(path)
        unet = [v for k, v in tensors.items() if k.startswith("model.diffusion_model.")]
        assert unet and all(v.dtype == torch.float16 for v in unet), path
        assert not any(k.startswith("model_ema.") for k in tensors), path


def test_builtin_model_is_the_default_and_text_conditioned(pipe):
    assert pipe.takes_text and pipe.spec.family == "custom"
    assert pipe.spec.autoencoder.resolution == 64


# Fixed seeds, so these are cases, not rates; `ldm eval-shapes` measures the rates (MODEL_CARD.md).
@pytest.mark.parametrize("prompt,seed", PROMPTS)
def test_builtin_model_draws_the_prompt(pipe, classifier, prompt, seed):
    with torch.no_grad():
        image = pipe.txt2img(prompt, width=64, height=64, steps=STEPS, guidance_scale=GUIDANCE, seed=seed).images[0]
    assert image.size == (64, 64)
    tensor = image_to_tensor(np.asarray(image))[None]
    wanted = read_description(prompt)
    for judge, reading in (("classifier", read_scenes(classifier, tensor)[0]), ("geometry", read_geometrically(tensor)[0])):
        # Every stated attribute of every object, the count and the background.
        hits = score_description(reading.objects, reading.background, wanted)
        assert hits["scene"] == [True], (prompt, judge, reading, hits)


def test_cli_txt2img_positional_prompt_uses_builtin_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "latent_diffusion.cli", "txt2img", "a red circle left of a blue square",
         "--seed", "3", "--steps", "8", "-o", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    files = list(tmp_path.glob("*.png"))
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)
    parameters = read_png_parameters(files[0])
    assert parameters.startswith("a red circle left of a blue square") and "Seed: 3" in parameters
    assert "Size: 64x64" in parameters
    assert re.search(r"CFG scale: 2(\.0)?,", parameters), parameters  # the built-in model's own default


def test_cli_txt2img_rejects_two_different_prompts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "latent_diffusion.cli", "txt2img", "a red circle", "--prompt", "a blue square",
         "-o", str(tmp_path)], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "positional PROMPT" in result.stderr


def test_cli_upscale_uses_builtin_superresolution_model(tmp_path):
    from latent_diffusion.data.shapes import Scene, downsample, render_scene, tensor_to_image

    scene = Scene.single("circle", "red", "large", "center")
    small = tensor_to_image(downsample(image_to_tensor(render_scene(scene, 64)), 16))
    Image.fromarray(small).save(tmp_path / "small.png")
    result = subprocess.run(
        [sys.executable, "-m", "latent_diffusion.cli", "upscale", "-i", str(tmp_path / "small.png"), "--seed", "0",
         "--steps", "8", "--cfg-scale", "1", "-o", str(tmp_path / "out"), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    files = list((tmp_path / "out").glob("*.png"))
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)


def test_render_folder_is_deterministic_and_captioned(tmp_path):
    from latent_diffusion.data.shapes_folder import render_folder

    first, second = render_folder(tmp_path / "a", 3, seed=5), render_folder(tmp_path / "b", 3, seed=5)
    for index in range(3):
        name = f"{index:06d}"
        assert (first / f"{name}.png").read_bytes() == (second / f"{name}.png").read_bytes()
        caption = (first / f"{name}.txt").read_text().strip()
        parse_caption(caption)  # the caption is in the grammar
        with Image.open(first / f"{name}.png") as image:
            assert image.size == (64, 64)
    with pytest.raises(ValueError, match="count"):
        render_folder(tmp_path / "c", 0)


def test_render_folder_draws_the_asked_share_of_two_object_scenes(tmp_path):
    from latent_diffusion.data.shapes_folder import render_folder

    def object_counts(probability: float) -> set[int]:
        folder = render_folder(tmp_path / str(probability), 6, seed=1, two_object_probability=probability)
        return {len(parse_caption((folder / f"{index:06d}.txt").read_text().strip()).objects) for index in range(6)}

    assert object_counts(1.0) == {2} and object_counts(0.0) == {1}


def test_render_folder_writes_the_builtin_model_s_mix(tmp_path):
    from latent_diffusion.data.shapes_folder import main
    from latent_diffusion.data.shapes_speech import read_description

    main([str(tmp_path / "mix"), "--count", "40", "--seed", "2", "--three-object-probability", "0.5",
          "--same-kind-probability", "1", "--spoken-share", "1", "--phrasings", "natural"])
    descriptions = [read_description((tmp_path / "mix" / f"{index:06d}.txt").read_text().strip()) for index in range(40)]
    assert {len(d.objects) for d in descriptions} == {1, 2, 3}
    # Every multi-object scene is of alike objects: as a count ("two red circles") or named each time.
    assert all(len({(o.shape, o.colour) for o in d.objects}) == 1 for d in descriptions)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--count", "2", "--same-kind-probability", "2"])


# Editing with the built-in models (latent_diffusion/evaluation/shapes_edits.py has the rates over
# many cases; MODEL_CARD.md the figures). Here two cases each, fixed seeds, read back by the classifier.
def test_builtin_model_inpaints_a_new_left_object(pipe, classifier):
    # The masked left half gets the object the prompt names (never the one it replaces, by the
    # cases' construction); the unmasked right object and the background stay.
    from latent_diffusion.evaluation.shapes_edits import inpaint_cases, inpaint_success, read, run_inpaint

    cases = inpaint_cases(2)
    with torch.no_grad():
        images = run_inpaint(pipe, cases)
    for reading, case in zip(read(classifier, images), cases):
        assert inpaint_success(reading, case), (case.prompt, reading)


def test_builtin_model_recolours_through_img2img(pipe, classifier):
    from latent_diffusion.evaluation.shapes_edits import read, recolour_cases, recolour_success, run_recolour

    cases = recolour_cases(2)
    with torch.no_grad():
        images = run_recolour(pipe, cases)
    for reading, case in zip(read(classifier, images), cases):
        assert recolour_success(reading, case), (case.prompt, reading)


def test_builtin_superresolution_beats_bicubic(classifier):
    from latent_diffusion.evaluation.shapes_edits import psnr, recolour_cases, read, run_upscale
    from latent_diffusion.pipelines.common import default_upscaler_path

    upscaler = Pipeline.from_checkpoint(default_upscaler_path(), progress=False)
    scenes = [case.source for case in recolour_cases(3, seed=1)]
    with torch.no_grad():
        upscaled, bicubic, renders = run_upscale(upscaler, scenes)
    assert psnr(upscaled, renders) > psnr(bicubic, renders)
    for reading, scene in zip(read(classifier, upscaled), scenes):
        (want,) = scene.objects
        assert [(o.shape, o.colour, o.position) for o in reading.objects] == [(want.shape, want.colour, want.position)]
