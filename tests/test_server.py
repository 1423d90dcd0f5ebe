"""The A1111-compatible API, driven over real HTTP (httpx) against a server on a loopback port."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from latent_diffusion.pipelines.png_info import parse_parameters  # noqa: E402
from latent_diffusion.server.app import ServerConfig  # noqa: E402
from latent_diffusion.server.generate import ServerLimits  # noqa: E402
from server_fixtures import (  # noqa: E402, F401 - models_dir, upscaler_path: fixtures
    b64_png, free_port, models_dir, png_from_b64, running_server, upscaler_path,
)

SMALL = {"width": 32, "height": 32, "steps": 3}
LIMITS = ServerLimits(max_size=64, max_steps=400, max_images=4, max_body_bytes=1_000_000)


@pytest.fixture(scope="module")
def base_url(models_dir, upscaler_path):
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", models_dir=models_dir, limits=LIMITS,
                          max_queue=2, preview_every=1, upscalers=[upscaler_path])
    with running_server(config) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        yield http
        # Every test leaves the server healthy and on the first model.
        assert http.get("/sdapi/v1/progress").status_code == 200
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"})


def txt2img(http, **fields):
    response = http.post("/sdapi/v1/txt2img", json={**SMALL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def post_retrying(base_url: str, path: str, payload: dict) -> httpx.Response:
    """POST from a client of its own, retrying while the server answers 429 (its queue holds 2)."""
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for _ in range(200):
            response = http.post(path, json=payload)
            if response.status_code != 429:
                return response
            time.sleep(0.05)
        return response


def pixels(image_b64: str) -> np.ndarray:
    return np.asarray(png_from_b64(image_b64).convert("RGB"))


def test_listings(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert all({"name", "aliases", "options"} <= set(s) for s in samplers)
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["alpha", "beta"]
    # File names only, no folders.
    assert all("/" not in m["filename"] and "\\" not in m["filename"] for m in models)
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("alpha.safetensors [")
    assert {"None", "Lanczos", "Nearest"} <= {u["name"] for u in client.get("/sdapi/v1/upscalers").json()}
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]
    assert "/sdapi/v1/txt2img" in client.get("/docs").text


def test_txt2img_images_carry_parameters_and_repeat_by_seed(client):
    body = txt2img(client, prompt="a red circle", negative_prompt="blue", seed=1234, batch_size=2, n_iter=2,
                   sampler_name="DPM++ 2M", cfg_scale=5)
    assert len(body["images"]) == 4
    info = json.loads(body["info"])
    assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    assert body["parameters"]["prompt"] == "a red circle"
    for image_b64, seed, infotext in zip(body["images"], info["all_seeds"], info["infotexts"]):
        image = png_from_b64(image_b64)
        assert image.format == "PNG" and image.size == (32, 32)
        assert image.info["parameters"] == infotext
        prompt, negative, settings = parse_parameters(image.info["parameters"])
        assert (prompt, negative) == ("a red circle", "blue")
        assert settings["Seed"] == str(seed) and settings["Sampler"] == "DPM++ 2M" and settings["CFG scale"] == "5"
    # The third image alone (its own seed) is the same picture: batches do not leak into each other.
    again = txt2img(client, prompt="a red circle", negative_prompt="blue", seed=1236, sampler_name="DPM++ 2M",
                    cfg_scale=5)
    np.testing.assert_array_equal(pixels(again["images"][0]), pixels(body["images"][2]))


def test_txt2img_with_the_hires_fix(client):
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes == ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                     "Latent (nearest)", "Latent (nearest-exact)"]
    hires = dict(prompt="a red circle", seed=3, enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5)
    for upscaler in ("Latent", "Lanczos", "tiny-x4"):  # a latent mode, a filter, a super-resolution model
        body = txt2img(client, **hires, hr_upscaler=upscaler)
        image = png_from_b64(body["images"][0])
        assert image.size == (64, 64)
        settings = parse_parameters(image.info["parameters"])[2]
        assert {k: settings.get(k) for k in ("Size", "Hires upscale", "Hires steps", "Hires upscaler",
                                              "Denoising strength")} == {
            "Size": "32x32", "Hires upscale": "2", "Hires steps": "2", "Hires upscaler": upscaler,
            "Denoising strength": "0.5"}
    resized = png_from_b64(txt2img(client, **hires, hr_resize_x=64, hr_resize_y=48, hr_scale=1)["images"][0])
    assert resized.size == (64, 48) and "Hires resize: 64x48" in resized.info["parameters"]
    # Without enable_hr the hires fields are ignored, as A1111 ignores them.
    plain = png_from_b64(txt2img(client, **{**hires, "enable_hr": False})["images"][0])
    assert plain.size == (32, 32) and "Hires" not in plain.info["parameters"]


def test_schedulers_listing_has_a1111s_shape(client):
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert all(set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for item in schedulers)
    by_name = {item["name"]: item for item in schedulers}
    assert schedulers[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                             "need_inner_model": False}
    assert by_name["karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                 "need_inner_model": False}
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"] and by_name["sgm_uniform"]["need_inner_model"]
    assert {"uniform", "exponential", "polyexponential", "simple", "normal", "ddim", "beta",
            "align_your_steps"} <= set(by_name)


def test_scheduler_field_is_used_and_written_to_the_parameters(client):
    request = dict(prompt="a square", seed=21, steps=4, width=32, height=32)
    karras = txt2img(client, sampler_name="DPM++ 2M", scheduler="Karras", **request)
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale" in json.loads(karras["info"])["infotexts"][0]
    assert json.loads(karras["info"])["scheduler"] == "Karras"
    # The old combined name is the same sampler and schedule; the sampler alone (Automatic) is not.
    combined = txt2img(client, sampler_name="DPM++ 2M Karras", scheduler="Automatic", **request)
    np.testing.assert_array_equal(pixels(combined["images"][0]), pixels(karras["images"][0]))
    automatic = txt2img(client, sampler_name="DPM++ 2M", **request)
    assert "Schedule type" not in json.loads(automatic["info"])["infotexts"][0]
    assert not np.array_equal(pixels(automatic["images"][0]), pixels(karras["images"][0]))
    info = client.post("/sdapi/v1/png-info", json={"image": karras["images"][0]}).json()
    assert info["parameters"]["Schedule type"] == "Karras"


def test_few_step_samplers_answer_to_their_a1111_names(client):
    assert {"LCM", "TCD"} <= {item["name"] for item in client.get("/sdapi/v1/samplers").json()}
    assert "trailing" in {item["name"] for item in client.get("/sdapi/v1/schedulers").json()}
    request = dict(prompt="a square", seed=22, width=32, height=32, cfg_scale=1)
    lcm = json.loads(txt2img(client, sampler_name="LCM", steps=4, **request)["info"])
    assert lcm["sampler_name"] == "LCM" and "Steps: 4, Sampler: LCM, CFG scale: 1," in lcm["infotexts"][0]
    # A Turbo model as A1111 users run one: Euler a, one step, no guidance, on the trailing timestep.
    turbo = json.loads(txt2img(client, sampler_name="Euler a", scheduler="Trailing", steps=1, **request)["info"])
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1," in turbo["infotexts"][0]


def test_eight_concurrent_clients_get_their_own_results(client, base_url):
    requests = [{"prompt": f"shape number {i}", "seed": 100 + i, **SMALL} for i in range(8)]
    expected = [pixels(txt2img(client, **r)["images"][0]) for r in requests]

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda request: post_retrying(base_url, "/sdapi/v1/txt2img", request), requests))
    for request, response, reference in zip(requests, responses, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        info = json.loads(body["info"])
        assert info["prompt"] == request["prompt"] and info["all_seeds"] == [request["seed"]]
        np.testing.assert_array_equal(pixels(body["images"][0]), reference)


def test_img2img_and_inpainting_keep_what_they_should(client):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    body = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(source)], "seed": 5,
                                                  "denoising_strength": 0.5, "prompt": "a square"}).json()
    assert len(body["images"]) == 1 and png_from_b64(body["images"][0]).size == (32, 32)
    assert "Denoising strength: 0.5" in png_from_b64(body["images"][0]).info["parameters"]

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))  # repaint the right half
    response = client.post("/sdapi/v1/img2img", json={
        **SMALL, "init_images": ["data:image/png;base64," + b64_png(source)], "mask": b64_png(mask),
        "mask_blur": 0, "denoising_strength": 1.0, "seed": 6})
    assert response.status_code == 200, response.text
    result = pixels(response.json()["images"][0])
    np.testing.assert_array_equal(result[:, :16], np.asarray(source)[:, :16])
    assert not np.array_equal(result[:, 16:], np.asarray(source)[:, 16:])


def test_png_info_and_upscale(client):
    body = txt2img(client, prompt="two circles", seed=77)
    info = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert info["parameters"]["Prompt"] == "two circles" and info["parameters"]["Seed"] == "77"
    assert info["info"] == json.loads(body["info"])["infotexts"][0]
    upscaled = client.post("/sdapi/v1/extra-single-image", json={
        "image": body["images"][0], "upscaling_resize": 2, "upscaler_1": "Lanczos"}).json()
    assert png_from_b64(upscaled["image"]).size == (64, 64)


def test_upscale_with_a_super_resolution_model(client):
    assert "tiny-x4" in [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    response = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64_png(small), "upscaling_resize": 4, "upscaler_1": "tiny-x4"})
    assert response.status_code == 200, response.text
    upscaled = png_from_b64(response.json()["image"])
    assert upscaled.size == (64, 64) and "tiny-x4" in upscaled.info["parameters"]
    # The model's output, not a resampled copy of the input.
    lanczos = np.asarray(small.resize((64, 64), Image.Resampling.LANCZOS))
    assert not np.array_equal(np.asarray(upscaled.convert("RGB")), lanczos)


def test_model_switch_through_options(client):
    seed = {"prompt": "a triangle", "seed": 9}
    alpha = txt2img(client, **seed)
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("beta.safetensors")
    beta = txt2img(client, **seed)
    assert "Model: beta" in png_from_b64(beta["images"][0]).info["parameters"]
    assert not np.array_equal(pixels(alpha["images"][0]), pixels(beta["images"][0]))
    # A title as listed (with its hash) works too; switching back restores the same pictures.
    alpha_title = next(t for t in titles if t.startswith("alpha"))
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": alpha_title}).status_code == 200
    np.testing.assert_array_equal(pixels(txt2img(client, **seed)["images"][0]), pixels(alpha["images"][0]))


def test_progress_preview_and_interrupt(client, base_url):
    outcome = {}

    def long_job():
        with httpx.Client(base_url=base_url, timeout=120) as http:
            outcome["response"] = http.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 400, "n_iter": 2,
                                                                       "sampler_name": "Euler"})

    thread = threading.Thread(target=long_job)
    thread.start()
    progress = None
    for _ in range(400):
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            break
        time.sleep(0.02)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 400
    assert png_from_b64(progress["current_image"]).size == (32, 32)
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    response = outcome["response"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) == 0
    # The next job is not affected by the interrupt.
    assert len(txt2img(client, seed=3)["images"]) == 1
    # The worker clears its job before the response goes out.
    assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def test_full_queue_answers_429_and_recovers(client, base_url):
    def post(payload):
        with httpx.Client(base_url=base_url, timeout=120) as http:
            return http.post("/sdapi/v1/txt2img", json=payload)

    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, {**SMALL, "steps": 400, "sampler_name": "Euler"})
        while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            time.sleep(0.02)
        waiting = [pool.submit(post, {**SMALL, "seed": i}) for i in range(2)]
        while client.get("/sdapi/v1/progress").json()["state"]["queue_length"] < 2:
            time.sleep(0.02)
        refused = client.post("/sdapi/v1/txt2img", json=SMALL)
        assert refused.status_code == 429 and "busy" in refused.json()["detail"]
        client.post("/sdapi/v1/interrupt")
        assert running.result().status_code == 200
        assert all(len(w.result().json()["images"]) == 1 for w in waiting)


def test_client_that_hangs_up_loses_its_waiting_job(client, base_url):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: httpx.post(f"{base_url}/sdapi/v1/txt2img", timeout=120,
                                                 json={**SMALL, "steps": 400, "sampler_name": "Euler"}))
        while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            time.sleep(0.02)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base_url}/sdapi/v1/txt2img", json=SMALL, timeout=0.5)
        for _ in range(100):
            state = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"]
            if state["queue_length"] == 0:
                break
            time.sleep(0.05)
        assert state["queue_length"] == 0 and state["sampling_step"] < 400
        client.post("/sdapi/v1/interrupt")
        assert running.result().status_code == 200


BAD_REQUESTS = [
    ("/sdapi/v1/txt2img", {"width": 33, "height": 32}, 400, "multiple of 8"),
    ("/sdapi/v1/txt2img", {"width": 128, "height": 32}, 400, "limit of 64"),
    ("/sdapi/v1/txt2img", {**SMALL, "steps": 401}, 400, "limit of 400"),
    ("/sdapi/v1/txt2img", {**SMALL, "steps": 0}, 422, "steps"),
    ("/sdapi/v1/txt2img", {**SMALL, "batch_size": 3, "n_iter": 2}, 400, "6 images"),
    ("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Magic"}, 400, "unknown sampler"),
    ("/sdapi/v1/txt2img", {**SMALL, "scheduler": "Wobbly"}, 400,
     "unknown scheduler 'Wobbly'; choose one of: automatic (Automatic), uniform (Uniform), karras (Karras)"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": [b64_png(Image.new("RGB", (32, 32)))],
                           "sampler_name": "DPM++ 2M Karras", "scheduler": "Beta"}, 400, "already chooses"),
    ("/sdapi/v1/txt2img", {**SMALL, "seed": -5}, 422, "seed"),
    ("/sdapi/v1/txt2img", {**SMALL, "cfg_scale": "lots"}, 422, "cfg_scale"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": ["not base64!"]}, 400, "not valid base64"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": [base64.b64encode(b"hello").decode()]}, 400, "not a readable"),
    ("/sdapi/v1/img2img", {**SMALL}, 422, "init_images"),
    ("/sdapi/v1/img2img", {**SMALL, "init_images": [b64_png(Image.new("RGB", (32, 32)))],
                           "denoising_strength": 0}, 400, "strength"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_scale": 1}, 400, "above 1 and at most 4"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 400,
     "unknown hires upscaler 'ESRGAN_4x'; choose one of 'Latent'"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "denoising_strength": 1.5}, 422, "denoising_strength"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_resize_x": 100}, 400, "multiple of 8"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_scale": 4}, 400,
     "makes 128x128, beyond this server's limit of 64"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_second_pass_steps": 401}, 400, "limit of 400"),
    ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_sampler_name": "Magic"}, 400, "unknown sampler 'Magic'"),
    ("/sdapi/v1/png-info", {"image": ""}, 400, "empty"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "../../etc/passwd"}, 400, "unknown model"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "/tmp/alpha.safetensors"}, 400, "unknown model"),
    ("/sdapi/v1/extra-single-image", {"image": b64_png(Image.new("RGB", (64, 64))), "upscaling_resize": 8,
                                      "upscaler_1": "Lanczos"}, 400, "limit"),
    ("/sdapi/v1/extra-single-image", {"image": b64_png(Image.new("RGB", (32, 32))), "upscaler_1": "ESRGAN"},
     400, "unknown upscaler"),
]


@pytest.mark.parametrize("path,payload,status,words", BAD_REQUESTS, ids=[f"{p}-{w}" for p, _, _, w in BAD_REQUESTS])
def test_bad_input_gets_a_clear_4xx(client, path, payload, status, words):
    response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json())
    assert len(txt2img(client, seed=1)["images"]) == 1


def test_oversized_body_is_413(client):
    huge = {"init_images": ["A" * 1_200_000], **SMALL}
    response = client.post("/sdapi/v1/img2img", json=huge)
    assert response.status_code == 413 and "limit of 1000000 bytes" in response.json()["detail"]


def test_unparseable_body_is_422(client):
    response = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_api_auth(models_dir):
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", api_auth=["me:secret"], limits=LIMITS)
    with running_server(config) as url, httpx.Client(base_url=url, timeout=60) as http:
        refused = http.get("/sdapi/v1/sd-models")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert http.get("/", auth=("me", "wrong")).status_code == 401
        assert http.get("/sdapi/v1/sd-models", auth=("me", "secret")).status_code == 200
        assert http.get("/sdapi/v1/options", headers={"Authorization": "Bearer me:secret"}).status_code == 200


def test_ldm_serve_command_binds_loopback(models_dir):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "latent_diffusion.cli", "serve", "--checkpoint", str(models_dir / "alpha.safetensors"),
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_line = process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in first_line, first_line
        for _ in range(200):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert response.json()[0]["model_name"] == "alpha"
    finally:
        process.terminate()
        process.wait(30)


def test_ldm_serve_bad_checkpoint_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "latent_diffusion.cli", "serve", "--checkpoint",
                             str(tmp_path / "missing.safetensors")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_failed_job_leaves_the_others_alone(client, base_url, models_dir):
    broken = models_dir / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    try:
        with ThreadPoolExecutor(3) as pool:
            before = pool.submit(post_retrying, base_url, "/sdapi/v1/txt2img", {**SMALL, "seed": 1})
            switch = pool.submit(post_retrying, base_url, "/sdapi/v1/options", {"sd_model_checkpoint": "broken"})
            after = pool.submit(post_retrying, base_url, "/sdapi/v1/txt2img", {**SMALL, "seed": 2})
            assert switch.result().status_code == 400 and "broken" in switch.result().json()["detail"]
            assert before.result().status_code == 200 and after.result().status_code == 200
        # The failed load kept the model that was serving.
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha")
        assert "Model: alpha" in png_from_b64(txt2img(client, seed=3)["images"][0]).info["parameters"]
    finally:
        broken.unlink()


def test_a1111_client_payload_with_fields_we_do_not_use(client):
    # The body an A1111 client library sends by default (hires fix off, scripts empty, subseeds...).
    payload = {
        "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
        "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
        "prompt": "a circle", "styles": [], "seed": 11, "subseed": -1, "subseed_strength": 0.0,
        "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": None, "sampler_index": "Euler a",
        "batch_size": 1, "n_iter": 1, "steps": 3, "cfg_scale": 7.0, "width": 32, "height": 32,
        "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
        "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
        "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
        "script_name": None, "send_images": True, "save_images": False, "alwayson_scripts": {},
    }
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["sampler_name"] == "Euler a"
    assert "Seed: 11" in png_from_b64(response.json()["images"][0]).info["parameters"]


def test_builtin_model_serves_out_of_the_box():
    from latent_diffusion.pipelines.common import default_checkpoint_path

    try:
        default_checkpoint_path()
    except FileNotFoundError:
        pytest.skip("the built-in shapes model is not installed in latent_diffusion/assets yet")
    with running_server(ServerConfig(limits=LIMITS)) as url, httpx.Client(base_url=url, timeout=300) as http:
        assert http.get("/sdapi/v1/sd-models").json()[0]["filename"].startswith("shapes")
        response = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": 64, "height": 64,
                                                        "steps": 4, "seed": 1})
        assert response.status_code == 200, response.text
        assert png_from_b64(response.json()["images"][0]).size == (64, 64)


def test_server_loads_models_in_the_pipeline_modes_asked_for(models_dir):
    from latent_diffusion.nn.bf16 import has_native_bf16
    from latent_diffusion.server.app import ServerState

    options = {"tiled_vae": True, "bf16": has_native_bf16("cpu")}
    state = ServerState(ServerConfig(checkpoint=models_dir / "alpha.safetensors", limits=LIMITS, upscalers=[],
                                     pipeline_options=options))
    pipe = state.models.pipeline
    assert pipe.tiled_vae
    expected = torch.bfloat16 if options["bf16"] else torch.float32
    assert next(pipe.model.unet.parameters()).dtype == expected
