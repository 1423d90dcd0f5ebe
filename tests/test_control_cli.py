"""``ldm txt2img/img2img/inpaint --control ...`` on the tiny model, and its bad input: one clear line,
checked before the model loads."""
from __future__ import annotations

import dataclasses
import re

import pytest

from controlnet_tiny import TINY_CONTROLNET, random_controlnet
from latent_diffusion.checkpoints.controlnet import save_controlnet
from latent_diffusion.pipelines.png_info import parse_parameters, read_png_parameters
from pipeline_tiny import TINY_SD1, write_checkpoint, write_task_images
from test_cli_errors import loads, one_error_line, run  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control_cli")
    write_task_images(folder)
    write_checkpoint(TINY_SD1, folder / "tiny.safetensors")
    save_controlnet(random_controlnet(seed=1), folder / "cn.safetensors")
    other = dataclasses.replace(TINY_CONTROLNET, unet=dataclasses.replace(TINY_CONTROLNET.unet, context_dim=768))
    save_controlnet(random_controlnet(other), folder / "sd15_cn.safetensors")
    (folder / "notes.png").write_text("not an image")
    return folder


def test_txt2img_with_two_units_records_them(capsys, files, tmp_path):
    code, out, err = run(capsys, "txt2img", "a red circle", "--checkpoint", files / "tiny.safetensors",
                         "-W", 32, "-H", 32, "--steps", 2, "--seed", 4, "--outdir", tmp_path, "-q",
                         "--control", f"{files / 'cn.safetensors'}:{files / 'image.png'}:0.6",
                         "--control", f"{files / 'cn.safetensors'}:{files / 'mask.png'}",
                         "--control-preprocess", "canny", "--control-preprocess", "none",
                         "--control-end", 0.5, "--control-mode", "control")
    assert code == 0, err
    pngs = sorted(tmp_path.glob("*.png"))
    _prompt, _negative, settings = parse_parameters(read_png_parameters(pngs[0]))
    assert settings["ControlNet 0"].startswith("Module: canny, Model: cn [")
    assert "Weight: 0.6" in settings["ControlNet 0"] and "Guidance End: 0.5" in settings["ControlNet 0"]
    assert "Control Mode: ControlNet is more important" in settings["ControlNet 1"]
    assert "Module: none" in settings["ControlNet 1"] and "Weight: 1.0" in settings["ControlNet 1"]


def test_img2img_unit_without_image_takes_the_init_image(capsys, files, tmp_path):
    code, _, err = run(capsys, "img2img", "a cat", "-i", files / "image.png", "--checkpoint", files / "tiny.safetensors",
                       "--steps", 2, "--outdir", tmp_path, "-q", "--control", f"{files / 'cn.safetensors'}::1.5",
                       "--control-preprocess", "invert")
    assert code == 0, err
    assert "Module: invert" in read_png_parameters(next(tmp_path.glob("*.png")))


@pytest.mark.parametrize("options, message", [
    (["--control", "{cn}:{image}:strong"], "the weight must be a number, got 'strong'"),
    (["--control", "{cn}:{image}", "--control-start", "0.8", "--control-end", "0.2"],
     r"guidance start \(0.8\) is after its end \(0.2\)"),
    (["--control", "{cn}:{image}", "--control-preprocess", "sobel"], "unknown ControlNet preprocessor 'sobel'"),
    (["--control", "{cn}:{notes}"], "notes.png"),
    (["--control", "{cn}:{image}", "--control-end", "soon"], "--control-end soon: not a number"),
    (["--control", "{cn}:{image}", "--control-mode", "a", "--control-mode", "b", "--control-mode", "c"],
     "--control-mode given 3 times for 1 --control units"),
    (["--control-preprocess", "canny"], "--control-preprocess needs --control"),
    (["--control", "{folder}/missing.safetensors:{image}"], "ControlNet not found"),
])
def test_bad_control_options_fail_before_the_model_loads(capsys, files, loads, options, message):  # noqa: F811
    names = dict(cn=files / "cn.safetensors", image=files / "image.png", notes=files / "notes.png", folder=files)
    code, _, err = run(capsys, "txt2img", "x", "--checkpoint", files / "tiny.safetensors", "-W", 32, "-H", 32,
                       *[o.format(**names) for o in options])
    assert code == 2
    line = one_error_line("txt2img", err)
    assert re.search(message, line), line
    assert loads == []


def test_another_familys_controlnet_is_one_line(capsys, files, tmp_path):
    code, _, err = run(capsys, "txt2img", "x", "--checkpoint", files / "tiny.safetensors", "-W", 32, "-H", 32,
                       "--outdir", tmp_path, "--control", f"{files / 'sd15_cn.safetensors'}:{files / 'image.png'}")
    assert code == 2
    assert "'sd15_cn' is an SD 1.x ControlNet and does not fit 'tiny'" in one_error_line("txt2img", err)
    assert not list(tmp_path.glob("*.png"))
