"""``<lora:...>`` in prompts through the pipeline and ``ldm``: merged for that prompt only, recorded in
the PNG parameters, found in ``--lora-dir``, listed by ``ldm loras``; bad tags are one clear line."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from latent_diffusion import cli
from latent_diffusion.addons.lora_file import read_lora_file
from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.nn.bf16 import has_native_bf16
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.pipelines.png_info import read_png_parameters
from lora_tiny import TEXT_LAYERS, kohya_lora, layers
from pipeline_tiny import TINY_SD1, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = dict(width=32, height=32, steps=3, seed=5, sampler="euler")
UNET = re.compile(r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|in_layers\.2)")
TEXT = re.compile(r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-pipeline")
    checkpoint = write_checkpoint(TINY_SD1, folder / "model.safetensors")
    model = Pipeline.from_checkpoint(checkpoint, progress=False).model
    loras = folder / "loras"
    (loras / "styles").mkdir(parents=True)
    for seed, path in enumerate((loras / "style.safetensors", loras / "styles" / "ink.safetensors")):
        save_safetensors({**kohya_lora(layers(model.unet, UNET), "lora_unet_", seed=seed, scale=0.4),
                          **kohya_lora(layers(model.condition_encoder, TEXT), "lora_te_", seed=seed + 7, scale=0.4)},
                         path, metadata={"ss_output_name": f"alias{seed}"})
    # An SDXL LoRA: its cross-attention reads a 2048-wide context.
    save_safetensors({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4)},
                     loras / "xl-detail.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return checkpoint, loras


def _kohya_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def _image(result) -> np.ndarray:
    return np.asarray(result.images[0])


def _by_hand(checkpoint, loras, *uses) -> Pipeline:
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False)
    MergedLoras(pipe.model, pipe.family, pipe.spec).apply(
        [LoraUse(read_lora_file(loras / f"{name}.safetensors"), unet=unet, text=text) for name, text, unet in uses])
    return pipe


def test_a_prompt_tag_merges_its_lora_for_that_prompt_and_records_its_hash(files):
    checkpoint, loras = files
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras)
    plain = Pipeline.from_checkpoint(checkpoint, progress=False).txt2img("a red circle", **OPTIONS)
    # A1111's order: the text encoders' weight first, then the UNet's.
    tagged = pipe.txt2img("a red circle <lora:style:0.8:0.5>", **OPTIONS)
    expected = _by_hand(checkpoint, loras, ("style", 0.8, 0.5)).txt2img("a red circle ", **OPTIONS)
    np.testing.assert_array_equal(_image(tagged), _image(expected))
    assert not np.array_equal(_image(tagged), _image(plain))
    assert tagged.parameters[0].startswith("a red circle <lora:style:0.8:0.5>\n")
    assert f'Lora hashes: "style: {_kohya_hash(loras / "style.safetensors")}"' in tagged.parameters[0]

    # The next prompt names no LoRA: the original weights are back.
    np.testing.assert_array_equal(_image(pipe.txt2img("a red circle", **OPTIONS)), _image(plain))


def test_two_loras_in_one_prompt_with_their_own_weights(files):
    checkpoint, loras = files
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras)
    tagged = pipe.txt2img("<lora:style:0.5> a circle, <lora:styles/ink:te=0.3:unet=0.7>", **OPTIONS)
    expected = _by_hand(checkpoint, loras, ("style", 0.5, 0.5), ("styles/ink", 0.3, 0.7)).txt2img(" a circle, ", **OPTIONS)
    np.testing.assert_array_equal(_image(tagged), _image(expected))
    ink = _kohya_hash(loras / "styles" / "ink.safetensors")
    assert f'Lora hashes: "style: {_kohya_hash(loras / "style.safetensors")}, styles/ink: {ink}"' in tagged.parameters[0]


def test_bad_tags_and_foreign_loras_are_named(files):
    checkpoint, loras = files
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras)
    with pytest.raises(ValueError, match=r"unknown LoRA 'styel': no such file in .*loras; did you mean style"):
        pipe.txt2img("<lora:styel:1>", **OPTIONS)
    with pytest.raises(ValueError, match=r"prompt tag <lora:style:strong>: the weight 'strong' is not a number"):
        pipe.txt2img("<lora:style:strong>", **OPTIONS)
    with pytest.raises(CheckpointError, match=r"xl-detail.safetensors is for sdxl models .*2048-wide"):
        pipe.txt2img("a circle <lora:xl-detail:1>", **OPTIONS)
    with pytest.raises(FileNotFoundError, match="LoRA folder not found"):
        Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras / "missing")


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_takes_lora_dir_lists_loras_and_refuses_bad_tags_before_loading(files, tmp_path, capsys, monkeypatch):
    checkpoint, loras = files
    code, out, _ = run(capsys, "loras", "--lora-dir", loras)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NAME", "FAMILY", "FILE"]
    assert ["xl-detail", "sdxl", "xl-detail.safetensors"] in rows and ["ink", "unknown", "styles/ink.safetensors"] in rows

    loads = []
    monkeypatch.setattr(Pipeline, "from_checkpoint", classmethod(lambda cls, *a, **k: loads.append(a)))
    for prompt, message in (("<lora:nope:1>", "unknown LoRA 'nope'"), ("<lora:style:1:2:3>", "at most two weights")):
        code, _, err = run(capsys, "txt2img", prompt, "-c", checkpoint, "--lora-dir", loras, "-o", tmp_path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert loads == []
    monkeypatch.undo()

    code, out, err = run(capsys, "txt2img", "a circle <lora:ink:0.6>", "-c", checkpoint, "--lora-dir", loras,
                         "-o", tmp_path, "-W", 32, "-H", 32, "--steps", 2, "-q")
    assert code == 0, err
    written = sorted(tmp_path.glob("*.png"))
    assert len(written) == 1 and "Lora hashes: \"ink: " in read_png_parameters(written[0])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (np.asarray(x, np.float64) / 255 for x in (a, b))
    return 10 * np.log10(1 / max(np.mean((a - b) ** 2), 1e-12))


def test_lora_merges_into_lean_half_precision_weights_and_comes_out_bitwise(files):
    import copy

    from latent_diffusion.nn.lean import _parameter_count, make_lean

    checkpoint, loras = files
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False)
    lean = copy.deepcopy(pipe.model)
    # Tiny blocks: store all but the timestep MLP in fp16, as lean mode stores a full-size UNet.
    make_lean(lean.unet, unit_parameters=200_000, min_parameters=_parameter_count(lean.unet.time_embed) + 1)
    stored = {k: v.clone() for k, v in lean.state_dict().items()}
    assert any(v.dtype == torch.float16 for v in stored.values())
    merged = MergedLoras(lean, pipe.family, pipe.spec)
    merged.apply([LoraUse(read_lora_file(loras / "style.safetensors"), 1.0, 1.0)])
    exact = _by_hand(checkpoint, loras, ("style", 1.0, 1.0)).model
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        ours, reference = lean.unet(x, torch.tensor([300]), context), exact.unet(x, torch.tensor([300]), context)
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max() < 1e-2 * reference.abs().max()  # fp16 rounding of the weights only
    merged.apply([])
    assert all(torch.equal(lean.state_dict()[k], v) for k, v in stored.items())


@pytest.mark.skipif(not has_native_bf16("cpu"), reason="this CPU has no native bfloat16")
def test_lora_in_bf16_mode_makes_nearly_the_fp32_lora_image(files):
    checkpoint, loras = files
    prompt = "a red circle <lora:style:0.9>"
    exact = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras).txt2img(prompt, **OPTIONS)
    fast_pipe = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras, bf16=True)
    fast = fast_pipe.txt2img(prompt, **OPTIONS)
    plain = fast_pipe.txt2img("a red circle", **OPTIONS)
    assert _psnr(_image(fast), _image(exact)) >= 30 > _psnr(_image(plain), _image(exact))


@pytest.mark.slow  # compiling the tiny UNet twice (the third image's weights are on disk) takes minutes
def test_a_compiled_unet_is_compiled_again_when_a_lora_changes_its_weights(files, monkeypatch):
    from latent_diffusion.nn import compiled as compiled_module

    monkeypatch.setattr(compiled_module, "AUTOTUNE_BELOW", 0)  # the plain compile: a third of the time
    checkpoint, loras = files
    prompt = "a red circle <lora:style:0.9>"
    exact = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras)
    compiled = Pipeline.from_checkpoint(checkpoint, progress=False, lora_dir=loras, compile_unet=True)
    for text in ("a red circle", prompt, "a red circle"):
        assert np.abs(_image(compiled.txt2img(text, **OPTIONS)).astype(int)
                      - _image(exact.txt2img(text, **OPTIONS)).astype(int)).max() <= 1
