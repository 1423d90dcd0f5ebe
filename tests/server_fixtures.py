"""A real ``ldm serve`` app on a loopback port, in a thread, on tiny random-weight models (server and web UI tests)."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from pipeline_tiny import TINY_SD1, TINY_X4, write_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_models(folder: Path) -> Path:
    """A model folder with two tiny SD 1 checkpoints of different weights (alpha loads first)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(TINY_SD1, folder / "alpha.safetensors", seed=0)
    write_checkpoint(TINY_SD1, folder / "beta.safetensors", seed=1)
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A folder of two tiny SD 1 checkpoints (see :func:`tiny_models`), one per test module."""
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def upscaler_path(tmp_path_factory):
    """A tiny random-weight SD x4 upscaler checkpoint, listed by servers as "tiny-x4"."""
    return write_checkpoint(TINY_X4, tmp_path_factory.mktemp("upscalers") / "tiny-x4.safetensors")


@contextmanager
def running_server(config):
    """Serve ``create_app(config)`` with uvicorn on 127.0.0.1:<free port>; yields the base URL, stops at exit."""
    import uvicorn

    from latent_diffusion.server.app import create_app

    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_from_b64(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image
