"""The web page in a real headless Chromium (the Debian package) driven by Playwright, against a loopback server."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil

import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed for the browser tests")
pytest.importorskip("uvicorn")

from latent_diffusion.server.app import ServerConfig  # noqa: E402
from latent_diffusion.server.generate import ServerLimits  # noqa: E402
from server_fixtures import running_server, tiny_models  # noqa: E402

CHROMIUM = os.environ.get("LDM_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    models = tiny_models(tmp_path_factory.mktemp("ui-models"))
    config = ServerConfig(checkpoint=models / "alpha.safetensors", models_dir=models,
                          limits=ServerLimits(max_size=64, max_steps=1000, max_images=4), preview_every=1)
    with running_server(config) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, base_url):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base_url + "/")
    page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 0")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def fill_small(page, steps: int = 3, seed: int = 42) -> None:
    for field, value in (("#width", 32), ("#height", 32), ("#steps", steps), ("#seed", seed)):
        page.fill(field, str(value))


def image_size(page, selector: str) -> tuple[int, int]:
    return tuple(page.eval_on_selector(selector, "img => [img.naturalWidth, img.naturalHeight]"))


def test_txt2img_shows_image_and_parameters(page):
    assert page.locator("#model option").count() == 2
    page.fill("#prompt", "a red circle")
    page.fill("#negative_prompt", "blurry")
    page.select_option("#sampler_name", "DPM++ 2M")
    fill_small(page)
    page.fill("#batch_size", "2")
    page.click("#generate")
    result = page.locator("#gallery .result").first
    result.locator("img").wait_for()
    page.wait_for_function("document.querySelector('#gallery .result img').naturalWidth > 0")
    assert image_size(page, "#gallery .result img") == (32, 32)
    parameters = result.locator(".parameters").inner_text()
    assert parameters.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Seed: 42" in parameters and "Sampler: DPM++ 2M" in parameters and "Size: 32x32" in parameters
    assert page.locator("#error").is_hidden()
    # The batch's second image follows the first, with the next seed.
    assert page.locator("#gallery .result").count() == 2
    assert "Seed: 43" in page.locator("#gallery .result").nth(1).locator(".parameters").inner_text()


def test_hires_fix_section(page):
    page.fill("#prompt", "a red circle")
    fill_small(page, steps=2)
    page.check("#enable_hr")
    page.select_option("#hr_upscaler", "Latent (nearest-exact)")
    page.fill("#hr_second_pass_steps", "2")
    page.fill("#hr_denoising_strength", "0.4")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#gallery .result img')?.naturalWidth > 0")
    assert image_size(page, "#gallery .result img") == (64, 64)
    parameters = page.locator("#gallery .result .parameters").first.inner_text()
    for words in ("Size: 32x32", "Denoising strength: 0.4", "Hires upscale: 2", "Hires steps: 2",
                  "Hires upscaler: Latent (nearest-exact)"):
        assert words in parameters, parameters
    # "Use parameters" of a hires image turns the section on with its settings.
    page.uncheck("#enable_hr")
    page.select_option("#hr_upscaler", "Latent")
    page.locator("#gallery .result button[data-send=parameters]").first.click()
    page.wait_for_function("document.getElementById('enable_hr').checked")
    assert page.input_value("#hr_upscaler") == "Latent (nearest-exact)"
    assert page.input_value("#hr_denoising_strength") == "0.4"


def test_refiner_section(page):
    # The other tiny SD 1 model shares the first one's latent space, so it may finish its images.
    assert page.locator("#refiner_checkpoint option").count() == 3  # None and the two models
    page.fill("#prompt", "a red circle")
    fill_small(page, steps=4)
    page.select_option("#refiner_checkpoint", label="beta")
    page.fill("#refiner_switch_at", "0.5")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#gallery .result img')?.naturalWidth > 0")
    parameters = page.locator("#gallery .result .parameters").first.inner_text()
    assert "Refiner: beta [" in parameters and "Refiner switch at: 0.5" in parameters, parameters


def test_send_to_inpaint_with_a_drawn_mask_then_upscale(page):
    page.fill("#prompt", "a blue square")
    fill_small(page)
    page.click("#generate")
    page.locator("#gallery .result").first.locator("button[data-send=inpaint]").click()
    assert page.locator("#mask_canvas").is_visible()
    page.wait_for_function("document.getElementById('init_canvas').width === 32")
    box = page.locator("#mask_canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.8, steps=5)
    page.mouse.up()
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery .result').length === 2")
    parameters = page.locator("#gallery .result").first.locator(".parameters").inner_text()
    assert parameters.startswith("a blue square") and "Mask blur: 4" in parameters

    page.locator("#gallery .result").first.locator("button[data-send=upscale]").click()
    page.select_option("#upscaler_1", "Lanczos")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery .result').length === 3")
    page.wait_for_function("document.querySelector('#gallery .result img').naturalWidth > 0")
    assert image_size(page, "#gallery .result img") == (64, 64)


def test_model_switch_from_the_page(page, base_url):
    page.select_option("#model", label="beta")
    page.wait_for_function("!document.getElementById('generate').disabled")
    page.fill("#prompt", "a circle")
    fill_small(page)
    page.click("#generate")
    page.locator("#gallery .result").first.wait_for()
    assert "Model: beta" in page.locator("#gallery .result .parameters").first.inner_text()
    page.select_option("#model", label="alpha")
    page.wait_for_function("!document.getElementById('generate').disabled")
    import httpx

    assert httpx.get(base_url + "/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha")


def test_schedule_type_dropdown_is_sent_and_written(page):
    labels = page.eval_on_selector_all("#scheduler option", "options => options.map(o => o.value)")
    assert labels[0] == "Automatic" and {"Karras", "Exponential", "Align Your Steps", "SGM Uniform"} <= set(labels)
    assert page.input_value("#scheduler") == "Automatic"
    page.fill("#prompt", "a green square")
    page.select_option("#sampler_name", "DPM++ 2M")
    page.select_option("#scheduler", "Karras")
    fill_small(page)
    page.click("#generate")
    page.locator("#gallery .result").first.wait_for()
    parameters = page.locator("#gallery .result .parameters").first.inner_text()
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in parameters


def drop_png(page, text: str) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (24, 40)).save(buffer, format="PNG", pnginfo=info)
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "old.png", {type: "image/png"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", base64.b64encode(buffer.getvalue()).decode())
    # The page fills the fields in the same task as it shows the text.
    page.wait_for_function(f"document.getElementById('pnginfo-text').textContent === {json.dumps(text)}")


@pytest.mark.parametrize("settings, sampler, scheduler", [
    ("Sampler: Euler, Schedule type: Exponential", "Euler", "Exponential"),
    ("Sampler: DPM++ 2M Karras", "DPM++ 2M", "Karras"),  # written before schedulers were chosen apart
    ("Sampler: DDIM", "DDIM", "Automatic"),
])
def test_dropped_png_sets_sampler_and_schedule_type(page, settings, sampler, scheduler):
    page.select_option("#scheduler", "Beta")
    drop_png(page, f"a cat\nSteps: 5, {settings}, CFG scale: 3, Seed: 9, Size: 24x40")
    assert (page.input_value("#sampler_name"), page.input_value("#scheduler")) == (sampler, scheduler)


def test_dropped_png_fills_the_parameters(page):
    text = "two green triangles\nNegative prompt: noise\nSteps: 7, Sampler: DDIM, CFG scale: 3.5, Seed: 99, Size: 24x40"
    drop_png(page, text)
    page.wait_for_function("document.getElementById('prompt').value === 'two green triangles'")
    values = {field: page.input_value(f"#{field}") for field in
              ("negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "sampler_name")}
    assert values == {"negative_prompt": "noise", "steps": "7", "cfg_scale": "3.5", "seed": "99", "width": "24",
                      "height": "40", "sampler_name": "DDIM"}
    assert page.locator("#pnginfo-text").inner_text() == text


def test_live_progress_preview_and_interrupt(page):
    page.fill("#prompt", "a long job")
    fill_small(page, steps=1000)
    page.select_option("#sampler_name", "Euler")
    page.click("#generate")
    page.locator("#preview").wait_for(state="visible")
    page.wait_for_function("document.getElementById('progress').value > 0")
    page.click("#interrupt")
    page.wait_for_function("document.getElementById('error').textContent === 'interrupted'")
    page.wait_for_function("!document.getElementById('generate').disabled")
    assert page.locator("#progress-box").is_hidden() and page.locator("#gallery .result").count() == 0


def test_run_warnings_are_shown_and_cleared(page):
    fill_small(page, steps=1)
    page.fill("#prompt", "")
    page.click("#generate")
    page.locator("#warnings").wait_for(state="visible")
    assert page.locator("#warnings").inner_text().startswith("warning: the prompt is empty: the images are unconditional")
    page.fill("#prompt", "a red circle")
    page.click("#generate")
    page.locator("#warnings").wait_for(state="hidden")
    page.wait_for_function("document.querySelectorAll('#gallery .result').length >= 2")
