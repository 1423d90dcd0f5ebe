"""LoRAs and embeddings over the A1111 API: the listings A1111 answers, refreshes, tags in prompts, 4xx."""
from __future__ import annotations

import json
import re

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from latent_diffusion.checkpoints.io import save_safetensors  # noqa: E402
from latent_diffusion.pipelines.common import Pipeline  # noqa: E402
from latent_diffusion.pipelines.png_info import parse_parameters  # noqa: E402
from latent_diffusion.server.app import ServerConfig  # noqa: E402
from lora_tiny import kohya_lora, layers  # noqa: E402
from pipeline_tiny import TINY_SD1, write_checkpoint  # noqa: E402
from server_fixtures import png_from_b64, running_server  # noqa: E402

SMALL = {"width": 32, "height": 32, "steps": 2, "seed": 3, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-addons")
    checkpoint = write_checkpoint(TINY_SD1, folder / "tiny.safetensors")
    loras, embeddings = folder / "loras", folder / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    unet = Pipeline.from_checkpoint(checkpoint, progress=False).model.unet
    save_safetensors(kohya_lora(layers(unet, re.compile(r".*attn1\.to_q")), "lora_unet_", scale=0.5),
                     loras / "style.safetensors", metadata={"ss_output_name": "my style"})
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "step": 300}, embeddings / "fits.pt")
    save_safetensors({"emb_params": torch.randn(1, 768)}, embeddings / "sd15-only.safetensors")
    config = ServerConfig(checkpoint=checkpoint, lora_dir=loras, embeddings_dir=embeddings)
    with running_server(config) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield http, loras


def test_loras_and_embeddings_are_listed_as_a1111_lists_them(server):
    http, loras = server
    listed = http.get("/sdapi/v1/loras").json()
    assert [(e["name"], e["alias"], e["path"]) for e in listed] == [("style", "my style", "style.safetensors")]
    assert listed[0]["metadata"] == {"ss_output_name": "my style"}

    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "lora_unet_x.lora_up.weight": torch.zeros(1, 1)},
                     loras / "later.safetensors")
    assert len(http.get("/sdapi/v1/loras").json()) == 1  # read again on refresh only
    assert http.post("/sdapi/v1/refresh-loras").json() is None
    assert [e["name"] for e in http.get("/sdapi/v1/loras").json()] == ["later", "style"]

    embeddings = http.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"] == {"fits": {"step": 300, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                             "shape": 32, "vectors": 2}}
    assert list(embeddings["skipped"]) == ["sd15-only"] and embeddings["skipped"]["sd15-only"]["shape"] == 768


def test_prompt_tags_work_over_the_api_and_bad_ones_are_4xx(server):
    http, _ = server
    plain = http.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a circle"}).json()
    tagged = http.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": "a circle <lora:style:1>"}).json()
    _prompt, _negative, settings = parse_parameters(json.loads(tagged["info"])["infotexts"][0])
    assert settings["Lora hashes"].startswith("style: ")
    assert png_from_b64(tagged["images"][0]).tobytes() != png_from_b64(plain["images"][0]).tobytes()

    for prompt, message in (("<lora:missing:1>", "unknown LoRA 'missing'"),
                            ("<lora:style:x>", "the weight 'x' is not a number"),
                            ("a sd15-only circle", "embedding 'sd15-only'")):
        response = http.post("/sdapi/v1/txt2img", json={**SMALL, "prompt": prompt})
        assert response.status_code == 400 and message in response.json()["detail"], response.text
