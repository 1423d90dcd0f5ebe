"""What a model cannot read of a prompt is said: words it never saw, tokens past its encoder's window,
an empty prompt. Models trained here, the built-in one included, record their captions' words in the
file; older files of ours without that list are read as knowing the shapes caption grammar."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from latent_diffusion.data.shapes import ShapesDataset
from latent_diffusion.families.custom import shapes_grammar_words
from latent_diffusion.models.tokenizer import CLIPTokenizer
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.pipelines.txt2img import EMPTY_PROMPT
from latent_diffusion.training.shapes_text import CAPTION_MIX
from pipeline_tiny import TINY_SD1, write_checkpoint

FAST = {"width": 64, "height": 64, "steps": 1, "seed": 0}


@pytest.fixture(scope="module")
def builtin():
    return Pipeline.from_checkpoint(None, progress=False)


def unknown_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "never saw" in w]


def test_training_captions_of_every_phrasing_raise_no_warning(builtin):
    # The recorded vocabulary must cover what the built-in model was trained on, or it would cry wolf:
    # the grammar's phrasings and captions as people write them, held-out pairs included.
    dataset = ShapesDataset(400, seed=7, split="all", **CAPTION_MIX)
    captions = [dataset.scene(i)[1] for i in range(len(dataset))]
    assert {len(c.split(",")) for c in captions} >= {1, 3, 4}  # tags and sentences both drawn
    assert any(c.lower().startswith(("two ", "three ", "a pair of ")) for c in captions)
    for caption in captions:
        assert builtin.text.prompt_warnings(caption, "") == [], caption


@pytest.mark.parametrize("prompt,unknown", [
    ("a photo of a cat", ["photo", "cat"]),
    ("four blue hexagons", ["four", "hexagons"]),
    ("A Red Circle next to a Blue Square!", ["!"]),
    ("Un cercle rouge à gauche", ["un", "cercle", "rouge", "à", "gauche"]),
    ("赤い丸", ["赤い丸"]),
    ("a red circle, very detailed", ["very", "detailed"]),
    ("a crimson circle in the centre", ["crimson"]),  # "centre" is in captions as people write them
])
def test_unknown_words_are_named(builtin, prompt, unknown):
    result = builtin.txt2img(prompt, **FAST)
    assert len(result.images) == 1
    (warning,) = unknown_warnings(result.warnings)
    assert warning.startswith(f"the prompt has {len(unknown)} word(s) this model never saw")
    for word in unknown:
        assert repr(word) in warning
    for word in ("a", "red", "circle", "in", "the"):
        assert repr(word) not in warning


def test_unknown_words_of_the_negative_prompt_are_named(builtin):
    result = builtin.txt2img("a large red circle on the left", negative_prompt="blurry, red", **FAST)
    assert unknown_warnings(result.warnings) == [
        "the negative prompt has 1 word(s) this model never saw in training: 'blurry'; the image may not follow them"]


def test_a_prompt_past_the_window_says_how_many_tokens_were_dropped(builtin):
    window = builtin.spec.conditioner.max_seq_len  # 32: start + 30 tokens + end
    assert window - 2 == 30
    # 4 + 5 x 5 + 4 = 33 tokens, one per word here.
    prompt = "a red circle left " + "of a blue square , " * 5 + "on a black background"
    assert len(CLIPTokenizer().encode(prompt)) == 33
    result = builtin.txt2img(prompt, **FAST)
    (cut,) = [w for w in result.warnings if "dropped" in w]
    assert cut == ("the prompt is 33 tokens long but this model's text encoder reads 30; "
                   "the last 3 token(s) were dropped ('a black background')")
    fits = "a large red circle left of a small blue square on a black background"
    assert not [w for w in builtin.txt2img(fits, **FAST).warnings if "dropped" in w]


def test_an_empty_prompt_draws_unconditionally_and_says_so(builtin):
    result = builtin.txt2img("", **FAST)
    assert len(result.images) == 1 and result.warnings == [EMPTY_PROMPT]
    assert EMPTY_PROMPT in builtin.txt2img("   ", **FAST).warnings
    assert builtin.txt2img("a large red circle on the left", **FAST).warnings == []


def test_warnings_are_given_once_per_run_and_not_carried_to_the_next(builtin):
    result = builtin.txt2img("a photo of a cat", batch_size=1, batch_count=2, **FAST)
    assert len(result.images) == 2 and len(unknown_warnings(result.warnings)) == 1
    assert builtin.txt2img("a large red circle on the left", **FAST).warnings == []


def test_img2img_reports_unknown_words_too(builtin):
    image = builtin.txt2img("a large red circle on the left", **FAST).images[0]
    result = builtin.img2img("a blue dog", image, steps=2, strength=0.5, seed=0)
    assert "'dog'" in unknown_warnings(result.warnings)[0]


def test_clip_models_keep_quiet_about_long_prompts_and_any_word(tmp_path):
    # CLIP reads every word and takes long prompts in 77-token chunks: nothing is lost, nothing said.
    pipe = Pipeline.from_checkpoint(write_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors"), progress=False)
    long_prompt = "a photo of a cat, Un chat rouge, " * 20
    assert len(CLIPTokenizer().encode(long_prompt)) > 150
    result = pipe.txt2img(long_prompt, negative_prompt="blurry", width=32, height=32, steps=1, seed=0)
    assert result.warnings == []


def test_cli_prints_the_warnings_and_succeeds(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "latent_diffusion.cli", "txt2img", "a photo of a cat", "--steps", "1", "--seed", "0",
         "-o", str(tmp_path), "-q"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "warning: the prompt has 2 word(s) this model never saw in training: 'photo', 'cat'" in result.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_api_info_carries_the_warnings():
    httpx = pytest.importorskip("httpx")
    from latent_diffusion.server.app import ServerConfig
    from latent_diffusion.server.generate import ServerLimits
    from server_fixtures import running_server

    limits = ServerLimits(max_size=64, max_steps=10, max_images=2, max_body_bytes=1_000_000)
    with running_server(ServerConfig(limits=limits)) as url, httpx.Client(base_url=url, timeout=300) as http:
        response = http.post("/sdapi/v1/txt2img", json={"prompt": "a photo of a cat", "width": 64, "height": 64,
                                                        "steps": 1, "seed": 1})
        assert response.status_code == 200, response.text
        warnings = json.loads(response.json()["info"])["warnings"]
        assert len(unknown_warnings(warnings)) == 1 and "'cat'" in warnings[0]


def test_the_builtin_vocabulary_is_the_grammar_s_words():
    words = shapes_grammar_words()
    assert {"circle", "square", "triangle", "star", "left", "right", "above", "below", "gray", ","} <= words
    assert not {"grey", "centre", "two", "cat", "."} & words


# One plain window (ShortWindowText: brackets are text it reads), and A1111's syntax in 77-token chunks.
@pytest.mark.parametrize("window,prompt", [(16, "a green circle"), (77, "a (green:1.2) [circle]")])
def test_a_trained_model_records_its_caption_words_and_warns_outside_them(tmp_path, window, prompt):
    from latent_diffusion.checkpoints.load import load_checkpoint
    from latent_diffusion.training.config import load_experiment
    from latent_diffusion.training.ldm import train_ldm
    from test_training import TINY, images_and_autoencoder, ldm_overrides

    data = images_and_autoencoder(tmp_path)  # captions "a red square" and "a blue square"
    config = load_experiment(TINY / "ldm-txt2img.yaml", ldm_overrides(
        data, "ldm", "run.max_steps=1", "run.log_every=1", f"ldm.conditioner.max_seq_len={window}"))
    path = train_ldm(config)
    assert load_checkpoint(path).spec.conditioner.vocabulary == ("a", "blue", "red", "square")
    # The CompVis YAML beside the file cannot state the words; loading still finds them in the header.
    assert path.with_suffix(".yaml").is_file()
    assert load_checkpoint(path, config_yaml=path.with_suffix(".yaml")).spec.conditioner.vocabulary == (
        "a", "blue", "red", "square")
    pipe = Pipeline.from_checkpoint(path, progress=False)
    options = {"width": 16, "height": 16, "steps": 1, "seed": 0}
    assert pipe.txt2img("a red square", **options).warnings == []
    # Words of the shapes grammar, but not of this model's captions.
    (warning,) = unknown_warnings(pipe.txt2img(prompt, **options).warnings)
    assert warning.startswith("the prompt has 2 word(s)") and "'green', 'circle'" in warning
