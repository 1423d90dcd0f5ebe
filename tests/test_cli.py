"""Every ``ldm`` command run in a subprocess on tiny random-weight models, including bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_tiny import TINY_CLASS, TINY_SD1, TINY_X4, write_checkpoint, write_task_images

COMMANDS = ["info", "samplers", "txt2img", "img2img", "inpaint", "upscale", "sample", "png-info", "convert",
            "eval-shapes"]


def ldm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latent_diffusion.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from latent_diffusion.models.ldm import LatentDiffusion
    from latent_diffusion.training.ldm_model import export_single_file

    folder = tmp_path_factory.mktemp("models")
    class_model = export_single_file(LatentDiffusion(TINY_CLASS), None, (0.0, 0), folder / "classes.safetensors")
    return {"sd1": write_checkpoint(TINY_SD1, folder / "tiny.safetensors"),
            "x4": write_checkpoint(TINY_X4, folder / "x4.safetensors"), "class": class_model}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_task_images(tmp_path_factory.mktemp("images"))
    Image.open(folder / "mask.png").crop((0, 0, 24, 24)).save(folder / "mask24.png")
    (folder / "not-an-image.png").write_text("hello")
    (folder / "prompts.txt").write_text("a red circle\n\n(a blue:1.2) square\n")
    return folder


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option_with_its_default(command):
    result = ldm(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: ldm " + command in result.stdout
    if command in ("txt2img", "img2img", "inpaint", "upscale", "sample"):
        assert "(default: euler_a)" in result.stdout and "--checkpoint" in result.stdout


def test_samplers_lists_a1111_names():
    result = ldm("samplers")
    assert result.returncode == 0 and "euler_ancestral" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["dpmpp_2m", "DPM++", "2M", "20", "deterministic", "uniform"] in rows
    # The schedulers follow the samplers, under their machine names and A1111 labels.
    assert ["karras", "Karras"] in rows and ["align_your_steps", "Align", "Your", "Steps", "AYS"] in rows
    assert "'DPM++ 2M Karras' or dpmpp_2m_karras pick both" in result.stdout


def test_samplers_piped_into_a_reader_that_stops_early_ends_quietly():
    # The reader is gone before anything is written (as `ldm samplers | head -1` once head has exited).
    process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "samplers"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 0
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_scheduler_option_is_written_to_the_png_and_restored_from_it(models, tmp_path):
    common = ("-c", models["sd1"], "-p", "a square", "-W", 32, "-H", 32, "--steps", 4, "--seed", 3, "-q")
    result = ldm("txt2img", *common, "--sampler", "DPM++ 2M", "--scheduler", "exponential", "-o", tmp_path / "exp")
    assert result.returncode == 0, result.stderr
    png = tmp_path / "exp" / "00000-3.png"
    assert "Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale" in ldm("png-info", png).stdout
    assert json.loads(ldm("png-info", png, "--json").stdout)["Schedule type"] == "Exponential"
    again = ldm("txt2img", "-c", models["sd1"], "--from-png", png, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_pixels(tmp_path / "again" / "00000-3.png"), _pixels(png))
    plain = ldm("txt2img", *common, "--sampler", "DPM++ 2M", "-o", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    assert not np.array_equal(_pixels(tmp_path / "plain" / "00000-3.png"), _pixels(png))


def test_txt2img_writes_pngs_that_png_info_reads_and_that_regenerate_the_same_image(models, tmp_path):
    out = tmp_path / "out"
    result = ldm("txt2img", "-c", models["sd1"], "-p", "a red (circle:1.2), green", "-n", "blurry", "-W", 32, "-H", 32,
                 "--steps", 3, "--seed", 7, "--batch-size", 2, "--grid", "-o", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-8.png", "grid-00000-00001.png"]
    info = ldm("png-info", out / "00001-8.png", "--json")
    settings = json.loads(info.stdout)
    assert settings["prompt"] == "a red (circle:1.2), green" and settings["negative_prompt"] == "blurry"
    assert (settings["Seed"], settings["Size"], settings["Sampler"], settings["Steps"]) == ("8", "32x32", "Euler a", "3")
    again = ldm("txt2img", "-c", models["sd1"], "--from-png", out / "00001-8.png", "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_pixels(tmp_path / "again" / "00000-8.png"), _pixels(out / "00001-8.png"))


def test_prompts_file_runs_each_prompt_with_continuing_seeds(models, images, tmp_path):
    result = ldm("txt2img", "-c", models["sd1"], "--prompts-file", images / "prompts.txt", "-W", 32, "-H", 32,
                 "--steps", 2, "--seed", 3, "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-3.png", "00001-4.png"]
    assert ldm("png-info", tmp_path / "00001-4.png").stdout.startswith("(a blue:1.2) square")


def test_img2img_and_inpaint_with_an_ordinary_model(models, images, tmp_path):
    result = ldm("img2img", "-c", models["sd1"], "-i", images / "image.png", "-p", "x", "--strength", 0.5,
                 "--steps", 4, "--seed", 1, "-o", tmp_path / "i2i")
    assert result.returncode == 0, result.stderr
    assert "Denoising strength: 0.5" in ldm("png-info", tmp_path / "i2i" / "00000-1.png").stdout
    result = ldm("inpaint", "-c", models["sd1"], "-i", images / "image.png", "-m", images / "mask.png", "-p", "x",
                 "--mask-blur", 0, "--keep-unmasked", "--steps", 3, "--seed", 1, "-o", tmp_path / "inp")
    assert result.returncode == 0, result.stderr
    original, painted = _pixels(images / "image.png"), _pixels(tmp_path / "inp" / "00000-1.png")
    keep = np.asarray(Image.open(images / "mask.png")) == 0
    assert np.array_equal(original[keep], painted[keep])
    assert not np.array_equal(original[~keep], painted[~keep])


def test_upscale_and_class_sampling(models, images, tmp_path):
    result = ldm("upscale", "-c", models["x4"], "-i", images / "small.png", "-p", "sharp", "--steps", 2,
                 "--seed", 4, "-o", tmp_path / "up")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "up" / "00000-4.png").size == (64, 64)
    result = ldm("sample", "-c", models["class"], "--class-ids", 1, 3, "-W", 32, "-H", 32, "--steps", 2,
                 "--batch-size", 2, "--cfg-scale", 2, "--seed", 0, "-o", tmp_path / "cls")
    assert result.returncode == 0, result.stderr
    assert "Class: 3" in ldm("png-info", tmp_path / "cls" / "00001-1.png").stdout


def test_convert_both_ways_and_info(models, tmp_path):
    result = ldm("convert", models["sd1"], tmp_path / "folder")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "folder" / "unet" / "config.json").is_file()
    result = ldm("convert", tmp_path / "folder", tmp_path / "back.safetensors")
    assert result.returncode == 0, result.stderr
    info = ldm("info", tmp_path / "back.safetensors")
    assert info.returncode == 0 and "sd1" in info.stdout
    assert ldm("convert", models["sd1"], tmp_path / "folder").returncode != 0  # no silent overwrite


def test_eval_shapes_scores_the_renderer_perfectly_and_runs_a_model(models):
    renderer = ldm("eval-shapes", "--renderer", "--prompts-per-group", 2, "--json")
    assert renderer.returncode == 0, renderer.stderr
    scores = json.loads(renderer.stdout)
    assert all(value == 1.0 for group in scores["accuracy"].values() for value in group.values())
    model = ldm("eval-shapes", "-c", models["sd1"], "--prompts-per-group", 1, "--steps", 1, "--size", 64, "-q")
    assert model.returncode == 0, model.stderr
    assert "Fréchet distance" in model.stdout



def test_eval_shapes_scores_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on the left | a red circle on the left\na small blue star at the top\n", encoding="utf-8")
    renderer = ldm("eval-shapes", "--renderer", "--prompts", path, "--json")
    assert renderer.returncode == 0, renderer.stderr
    assert list(json.loads(renderer.stdout)["accuracy"]) == ["prompts"]
    assert all(value == 1.0 for value in json.loads(renderer.stdout)["accuracy"]["prompts"].values())
    both = ldm("eval-shapes", "--renderer", "--prompts", path, "--prompts-per-group", 1)
    assert both.returncode == 2 and "exclude each other" in both.stderr and "Traceback" not in both.stderr, both.stderr

BAD_INPUTS = {
    "missing checkpoint": (["txt2img", "-c", "{tmp}/nope.safetensors", "-W", 32, "-H", 32], "not found"),
    "width not multiple of 8": (["txt2img", "-c", "{sd1}", "-W", 30, "-H", 32], "not a multiple of 8"),
    "steps <= 0": (["txt2img", "-c", "{sd1}", "--steps", 0], "steps"),
    "unknown sampler": (["txt2img", "-c", "{sd1}", "--sampler", "warp_drive"], "unknown sampler"),
    "unknown scheduler": (["txt2img", "-c", "{sd1}", "--scheduler", "wobbly"],
                          "unknown scheduler 'wobbly'; choose one of: automatic (Automatic), uniform (Uniform)"),
    "two schedulers": (["img2img", "-c", "{sd1}", "-i", "{images}/image.png", "--sampler", "dpmpp_2m_karras",
                        "--scheduler", "beta"], "already chooses the Karras scheduler"),
    "missing init image": (["img2img", "-c", "{sd1}", "-i", "{images}/missing.png"], "not found"),
    "not an image": (["img2img", "-c", "{sd1}", "-i", "{images}/not-an-image.png"], "not a readable image"),
    "init image size": (["img2img", "-c", "{sd1}", "-i", "{images}/image.png", "-W", 36], "multiple of 8"),
    "mask size mismatch": (["inpaint", "-c", "{sd1}", "-i", "{images}/image.png", "-m", "{images}/mask24.png"],
                           "does not match"),
    "wrong model for the task": (["upscale", "-c", "{sd1}", "-i", "{images}/small.png", "--steps", 1],
                                 "super-resolution model"),
    "missing png": (["png-info", "{images}/missing.png"], "no such image"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_no_output(case, models, images, tmp_path):
    args, expected = BAD_INPUTS[case]
    args = [str(a).format(tmp=tmp_path, sd1=models["sd1"], images=images) for a in args]
    out = tmp_path / "out"
    if args[0] != "png-info":
        args += ["-o", str(out), "-p", "x"]
    result = ldm(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm {args[0]}: error:"), result.stderr
    assert expected in lines[0]
    assert not out.exists()


def test_missing_built_in_model_is_a_clear_error(tmp_path, monkeypatch):
    from latent_diffusion.pipelines import common

    monkeypatch.setattr(common, "ASSETS", tmp_path)  # an installation without the shipped weights
    with pytest.raises(FileNotFoundError, match="no built-in model is installed"):
        common.default_checkpoint_path()
