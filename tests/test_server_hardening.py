"""What a new user (or a hostile web page) can throw at the server: each case is answered with a clear 4xx
in one error shape, or handled, and the server keeps serving."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from latent_diffusion.server.app import ServerConfig  # noqa: E402
from latent_diffusion.server.generate import ServerLimits  # noqa: E402
from server_fixtures import (  # noqa: E402, F401 - models_dir, upscaler_path: fixtures
    b64_png, models_dir, png_from_b64, running_server, upscaler_path,
)

SMALL = {"width": 32, "height": 32, "steps": 3}
LIMITS = ServerLimits(max_size=64, max_steps=400, max_images=4, max_body_bytes=1_000_000)
ERROR_KEYS = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def base_url(models_dir, upscaler_path):
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", limits=LIMITS, upscalers=[upscaler_path])
    with running_server(config) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        yield http
        # Every test leaves the server answering normally.
        assert http.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 1}).status_code == 200


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ one error shape
@pytest.mark.parametrize("method,path,payload,status,words", [
    ("post", "/sdapi/v1/txt2img", {**SMALL, "steps": 0}, 422, "steps: Input should be greater than or equal to 1 (got 0)"),
    ("post", "/sdapi/v1/txt2img", {**SMALL, "cfg_scale": "lots"}, 422, "cfg_scale"),
    ("post", "/sdapi/v1/txt2img", {"width": 33, "height": 32}, 400, "width 33 is not a multiple of 8"),
    ("post", "/sdapi/v1/img2img", SMALL, 422, "init_images: Field required"),
    ("get", "/sdapi/v1/nowhere", None, 404, "Not Found"),
    ("delete", "/sdapi/v1/options", None, 405, "Method Not Allowed"),
])
def test_every_error_has_the_same_shape(client, method, path, payload, status, words):
    response = client.request(method.upper(), path, json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ERROR_KEYS and isinstance(body["detail"], str) and body["body"] == ""
    assert words in body["detail"]
    if status == 422:
        assert body["error"] == "ValidationError" and body["errors"][0]["loc"][0] == "body"
        assert {"loc", "msg", "type"} == set(body["errors"][0])
    else:
        assert body["errors"] == []


@pytest.mark.parametrize("content,content_type,words", [
    (b"{not json", "application/json", "not valid JSON"),
    (b'{"steps": 3', "application/json", "not valid JSON"),
    (b"", "application/json", "the request body must be a JSON object"),
    (b"steps=3", "application/x-www-form-urlencoded", "the request body must be a JSON object"),
    (b"[1, 2]", "application/json", "the request body must be a JSON object"),
])
def test_malformed_bodies_are_described(client, content, content_type, words):
    response = client.post("/sdapi/v1/txt2img", content=content, headers={"content-type": content_type})
    assert response.status_code == 422, response.text
    assert set(response.json()) == ERROR_KEYS and words in response.json()["detail"]


def test_validation_message_shortens_a_huge_value(client):
    response = client.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": 123456789 * 10**1000})
    assert response.status_code == 422
    assert "prompt: Input should be a valid string (got 123456789" in response.json()["detail"]
    assert len(response.json()["detail"]) < 200


# ------------------------------------------------------------------------------------------ request body limit
def pieces(body: bytes, size: int = 65536):
    """The body as an iterator, which httpx sends chunked (no Content-Length)."""
    return iter([body[i:i + size] for i in range(0, len(body), size)])


def test_chunked_body_over_the_limit_is_413(client):
    body = json.dumps({**SMALL, "prompt": "x" * 1_100_000}).encode()
    response = client.post("/sdapi/v1/txt2img", content=pieces(body), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "limit of 1000000 bytes" in response.json()["detail"]


def test_chunked_body_within_the_limit_is_served(client):
    body = json.dumps({**SMALL, "seed": 4}).encode()
    response = client.post("/sdapi/v1/txt2img", content=pieces(body, 10), headers={"content-type": "application/json"})
    assert response.status_code == 200 and len(response.json()["images"]) == 1


# ------------------------------------------------------------------------------------------ Host names
@pytest.mark.parametrize("host,allowed", [
    ("localhost:{port}", True), ("127.0.0.1:{port}", True), ("[::1]:{port}", True), ("LOCALHOST", True),
    ("evil.example", False), ("evil.example:{port}", False), ("127.0.0.1.evil.example", False),
])
def test_loopback_server_answers_only_to_loopback_names(client, base_url, host, allowed):
    port = base_url.rpartition(":")[2]
    response = client.get("/sdapi/v1/options", headers={"host": host.format(port=port)})
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400 and set(response.json()) == ERROR_KEYS
        assert host.format(port=port) in response.json()["detail"] and "--allow-host" in response.json()["detail"]


def test_host_names_a_server_answers_to():
    from latent_diffusion.server.gate import allowed_host_names

    assert allowed_host_names("0.0.0.0") is None and allowed_host_names("::") is None
    assert allowed_host_names("127.0.0.1") == {"localhost", "127.0.0.1", "[::1]"}
    assert allowed_host_names("::1", ["Studio.lan."]) == {"localhost", "127.0.0.1", "[::1]", "studio.lan"}
    assert "192.168.1.5" in allowed_host_names("192.168.1.5")


def test_allowed_host_reaches_the_server(models_dir):
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", limits=LIMITS, upscalers=[],
                          allowed_hosts=["studio.lan"])
    with running_server(config) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/sdapi/v1/options", headers={"host": "studio.lan:7860"}).status_code == 200
        assert http.get("/sdapi/v1/options", headers={"host": "other.lan"}).status_code == 400


# ------------------------------------------------------------------------------------------ docs
def test_docs_work_offline(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    # Nothing is loaded from elsewhere: no scripts at all, and no address outside this server.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "/sdapi/v1/txt2img" in page and "/sdapi/v1/extra-single-image" in page
    assert "<code>steps</code>" in page and "&lt;= 1000" in page and 'href="/openapi.json"' in page
    assert client.get("/openapi.json").json()["paths"]


# ------------------------------------------------------------------------------------------ upscaling
def test_interrupted_upscale_answers_normally(client, base_url):
    outcome = {}

    def upscale():
        with httpx.Client(base_url=base_url, timeout=300) as http:
            outcome["response"] = http.post("/sdapi/v1/extra-single-image", json={
                "image": b64_png(noise(32, 32)), "upscaling_resize": 4, "upscaler_1": "tiny-x4"})

    thread = threading.Thread(target=upscale)
    thread.start()
    for _ in range(3000):
        state = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
        if (state["textinfo"] or "").startswith("upscale") and state["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.02)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(300)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert "interrupted" in response.json()["html_info"]
    assert png_from_b64(response.json()["image"]).size == (128, 128)


def test_model_upscale_output_is_bounded(client):
    # 68 * 4 = 272 pixels per side from the x4 model, beyond this server's 4 * 64.
    response = client.post("/sdapi/v1/extra-single-image", json={
        "image": b64_png(noise(68, 68)), "upscaling_resize": 1, "upscaler_1": "tiny-x4"})
    assert response.status_code == 400 and "272x272" in response.json()["detail"]
    assert "limit of 256 pixels" in response.json()["detail"]


def test_model_upscale_runs_in_tiles_within_a_size_limit(models_dir, upscaler_path):
    from latent_diffusion.pipelines.common import Pipeline

    limits = ServerLimits(max_size=64, max_steps=10, max_images=1, max_upscale_input=24, upscale_tile=16)
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", limits=limits, upscalers=[upscaler_path])
    image = noise(20, 16, seed=3)
    with running_server(config) as url, httpx.Client(base_url=url, timeout=300) as http:
        refused = http.post("/sdapi/v1/extra-single-image", json={
            "image": b64_png(noise(28, 16)), "upscaling_resize": 1, "upscaler_1": "tiny-x4"})
        assert refused.status_code == 400 and "28x16" in refused.json()["detail"]
        assert "limit of 24 pixels per side" in refused.json()["detail"]
        response = http.post("/sdapi/v1/extra-single-image", json={
            "image": b64_png(image), "upscaling_resize": 4, "upscaler_1": "tiny-x4"})
        assert response.status_code == 200, response.text
    served = np.asarray(png_from_b64(response.json()["image"]).convert("RGB"))
    # The same model run by hand in 16-pixel tiles (overlapping by a quarter) gives the same picture.
    pipe = Pipeline.from_checkpoint(upscaler_path, progress=False)
    tiled = pipe.upscale(image, seed=0, tile_size=16, tile_overlap=4).images[0]
    np.testing.assert_array_equal(served, np.asarray(tiled))


def test_builtin_upscaler_refuses_inputs_beyond_its_training(models_dir):
    from latent_diffusion.server.models import builtin_upscalers

    if not builtin_upscalers():
        pytest.skip("the built-in super-resolution model is not installed")
    name = builtin_upscalers()[0].stem
    config = ServerConfig(checkpoint=models_dir / "alpha.safetensors", limits=LIMITS)
    with running_server(config) as url, httpx.Client(base_url=url, timeout=120) as http:
        refused = http.post("/sdapi/v1/extra-single-image", json={
            "image": b64_png(noise(64, 64)), "upscaling_resize": 4, "upscaler_1": name})
        assert refused.status_code == 400, refused.text
        assert "16x16" in refused.json()["detail"] and "recoloured" in refused.json()["detail"]
        served = http.post("/sdapi/v1/extra-single-image", json={
            "image": b64_png(noise(16, 16)), "upscaling_resize": 4, "upscaler_1": name})
        assert served.status_code == 200 and png_from_b64(served.json()["image"]).size == (64, 64)
        # Its UNet halves the input once: 2 pixels would leave one at the lowest level, where it fails.
        tiny = http.post("/sdapi/v1/extra-single-image", json={
            "image": b64_png(noise(2, 2)), "upscaling_resize": 4, "upscaler_1": name})
        assert tiny.status_code == 400 and "needs at least 4 pixels per side" in tiny.json()["detail"]
