"""The web page's ControlNet panel in a real headless Chromium: lists, the map preview, a controlled image."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed for the browser tests")
pytest.importorskip("uvicorn")

from controlnet_tiny import random_controlnet  # noqa: E402
from latent_diffusion.checkpoints.controlnet import save_controlnet  # noqa: E402
from latent_diffusion.server.app import ServerConfig  # noqa: E402
from latent_diffusion.server.generate import ServerLimits  # noqa: E402
from server_fixtures import running_server, tiny_models  # noqa: E402
from test_webui import browser, fill_small, image_size, page  # noqa: E402, F401


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    models = tiny_models(tmp_path_factory.mktemp("ui-models"))
    controlnets = tmp_path_factory.mktemp("ui-controlnets")
    save_controlnet(random_controlnet(seed=1), controlnets / "control_tiny.safetensors")
    config = ServerConfig(checkpoint=models / "alpha.safetensors", models_dir=models, preview_every=0,
                          limits=ServerLimits(max_size=64, max_images=4), controlnet_dir=controlnets)
    with running_server(config) as url:
        yield url


def test_controlnet_panel_previews_the_map_and_steers_txt2img(page, tmp_path):  # noqa: F811
    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[8:24, 8:24] = 230
    Image.fromarray(array).save(tmp_path / "square.png")
    page.wait_for_function("document.querySelectorAll('#cn_module option').length > 5")
    assert page.locator("#cn_model option").count() == 2  # None and the one ControlNet
    page.select_option("#cn_model", index=1)
    page.select_option("#cn_module", "canny")
    page.set_input_files("#cn_file", str(tmp_path / "square.png"))
    page.wait_for_timeout(200)
    page.click("#cn_preview_button")
    page.wait_for_function("document.getElementById('cn_preview').naturalWidth > 0")
    assert image_size(page, "#cn_preview") == (512, 512)  # the preprocessor's default resolution
    page.fill("#prompt", "a star")
    fill_small(page, steps=2)
    page.fill("#cn_weight", "1.5")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery .result img').length === 2")
    parameters = page.locator("#gallery .result .parameters").first.inner_text()
    assert 'ControlNet 0: "Module: canny, Model: control_tiny [' in parameters and "Weight: 1.5" in parameters
    assert page.locator("#error").is_hidden()


def test_txt2img_without_a_control_image_says_so(page):  # noqa: F811
    page.wait_for_function("document.querySelectorAll('#cn_model option').length === 2")
    page.select_option("#cn_model", index=1)
    fill_small(page, steps=1)
    page.click("#generate")
    page.wait_for_function("!document.getElementById('error').hidden")
    assert "choose a control image" in page.locator("#error").inner_text()
