"""A1111's ControlNet extension API over real HTTP: alwayson_scripts units on txt2img and img2img, the
model and module lists, detect, and refusals (4xx naming what was wrong)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from controlnet_tiny import TINY_CONTROLNET, random_controlnet  # noqa: E402
from latent_diffusion.checkpoints.controlnet import save_controlnet  # noqa: E402
from latent_diffusion.pipelines.common import Pipeline  # noqa: E402
from latent_diffusion.pipelines.control import ControlUnit, load_controlnet_for  # noqa: E402
from latent_diffusion.server.app import ServerConfig  # noqa: E402
from latent_diffusion.server.generate import ServerLimits  # noqa: E402
from server_fixtures import b64_png, models_dir, png_from_b64, running_server  # noqa: E402, F401

SMALL = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler", "seed": 5, "cfg_scale": 5.0}


def _edges_image() -> Image.Image:
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[8:24, 6:20] = (220, 180, 40)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    save_controlnet(random_controlnet(seed=1), folder / "control_tiny_canny.safetensors")
    other = dataclasses.replace(TINY_CONTROLNET, unet=dataclasses.replace(TINY_CONTROLNET.unet, context_dim=768))
    save_controlnet(random_controlnet(other), folder / "control_sd15_other.safetensors")
    (folder / "readme.txt").write_text("not listed")
    return folder


@pytest.fixture(scope="module")
def client(models_dir, controlnet_dir):  # noqa: F811
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", models_dir=models_dir, preview_every=0,
                          limits=ServerLimits(max_size=64, max_body_bytes=2_000_000), controlnet_dir=controlnet_dir)
    with running_server(config) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield http


def _unit(**fields):
    return {"enabled": True, "model": "control_tiny_canny", "module": "canny", "image": b64_png(_edges_image()),
            "weight": 1.5, "guidance_end": 0.7, "pixel_perfect": True, **fields}


def test_lists_and_version(client):
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert len(models) == 2 and models[0].startswith("control_sd15_other [") and models[1].startswith("control_tiny_canny [")
    modules = client.get("/controlnet/module_list").json()
    assert {"none", "canny", "threshold", "invert", "tile_resample", "shuffle", "inpaint"} <= set(modules["module_list"])
    assert modules["module_detail"]["canny"]["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1,
                                                              "max": 255, "step": 1.0}
    assert modules["module_detail"]["openpose"]["ready_map_only"] is True
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()["module_list"]
    assert "invert (from white bg & black line)" in aliases
    assert client.get("/controlnet/version").json() == {"version": 2}


def test_txt2img_unit_matches_the_python_api_and_appends_the_map(client, models_dir, controlnet_dir):  # noqa: F811
    title = client.get("/controlnet/model_list").json()["model_list"][1]
    body = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a star", "alwayson_scripts": {
        "controlnet": {"args": [_unit(model=title), {"enabled": False, "model": "nonsense"}]}}})
    assert body.status_code == 200, body.text
    images = body.json()["images"]
    assert len(images) == 2  # the image, then the canny map (as the extension answers)
    generated, detected = png_from_b64(images[0]), png_from_b64(images[1])
    assert set(np.unique(np.asarray(detected))) == {0, 255}
    assert f"ControlNet 0: \"Module: canny, Model: {title}, Weight: 1.5" in generated.info["parameters"]

    pipe = Pipeline.from_checkpoint(models_dir / "alpha.safetensors", progress=False)
    unit = ControlUnit(load_controlnet_for(pipe, controlnet_dir / "control_tiny_canny.safetensors"), _edges_image(),
                       weight=1.5, guidance_end=0.7, module="canny", pixel_perfect=True)
    expected = pipe.txt2img("a star", width=32, height=32, steps=3, sampler="Euler", seed=5, guidance_scale=5.0,
                            control=[unit])
    assert np.array_equal(np.asarray(generated.convert("RGB")), np.asarray(expected.images[0]))


def test_img2img_unit_without_image_takes_the_init_image(client):
    init = b64_png(_edges_image())
    payload = {**SMALL, "prompt": "a star", "init_images": [init], "denoising_strength": 0.8}
    with_init = client.post("/sdapi/v1/img2img", json={**payload, "alwayson_scripts": {"controlnet": {"args": [
        _unit(image=None, module="none", save_detected_map=False)]}}})
    explicit = client.post("/sdapi/v1/img2img", json={**payload, "alwayson_scripts": {"controlnet": {"args": [
        _unit(module="none", save_detected_map=False)]}}})
    assert with_init.status_code == explicit.status_code == 200, with_init.text
    assert len(with_init.json()["images"]) == 1
    assert with_init.json()["images"] == explicit.json()["images"]


@pytest.mark.parametrize("unit, status, message", [
    (_unit(model="control_v11p_sd15_canny"), 400, "unknown ControlNet model 'control_v11p_sd15_canny'; choose one of"),
    (_unit(image="bm90IGFuIGltYWdl"), 400, r"args\[0\].image is not a readable image"),
    (_unit(weight="strong"), 400, "weight must be a number, got 'strong'"),
    (_unit(guidance_start=0.9, guidance_end=0.1), 400, r"guidance start \(0.9\) is after its end \(0.1\)"),
    (_unit(module="sobel"), 400, "unknown ControlNet preprocessor 'sobel'"),
    (_unit(image=None), 400, "has no image"),
    (_unit(model="control_sd15_other"), 400, "is an SD 1.x ControlNet and does not fit 'alpha'"),
    ("canny", 400, "must be an object"),
])
def test_bad_units_are_4xx_naming_the_problem(client, unit, status, message):
    import re

    response = client.post("/sdapi/v1/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["detail"]), response.json()["detail"]


def test_detect_runs_a_preprocessor(client):
    response = client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                       "controlnet_input_images": [b64_png(_edges_image())],
                                                       "controlnet_processor_res": 64})
    assert response.status_code == 200, response.text
    edges = png_from_b64(response.json()["images"][0])
    assert edges.size == (64, 64) and set(np.unique(np.asarray(edges))) == {0, 255}
    depth = client.post("/controlnet/detect", json={"controlnet_module": "depth_midas",
                                                    "controlnet_input_images": [b64_png(_edges_image())]})
    assert "needs a learned detector" in depth.json()["info"]
    unknown = client.post("/controlnet/detect", json={"controlnet_module": "sobel",
                                                      "controlnet_input_images": [b64_png(_edges_image())]})
    assert unknown.status_code == 422 and "Module not available" in unknown.json()["detail"]
    empty = client.post("/controlnet/detect", json={"controlnet_module": "canny"})
    assert empty.status_code == 422 and "No image selected" in empty.json()["detail"]
    bad = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": ["xx"]})
    assert bad.status_code == 400
