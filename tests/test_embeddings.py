"""Textual-inversion embeddings against diffusers' ``load_textual_inversion``, and their bad inputs."""
from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import assert_close_to_reference
from latent_diffusion.addons.embeddings import read_embedding
from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.pipelines.common import Pipeline
from pipeline_tiny import TINY_SD1, TINY_SDXL, diffusers_components, diffusers_folder, sdxl_components, write_checkpoint

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a (mystyle:1.2) photo of a red circle, blue"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti")
    checkpoint = write_checkpoint(TINY_SD1, folder / "model.safetensors")
    embeddings = folder / "embeddings"
    embeddings.mkdir()
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    # A1111's .pt layout, multi-vector.
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": "mystyle", "step": 1200, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"},
               embeddings / "mystyle.pt")
    save_safetensors({"emb_params": torch.randn(64, generator=torch.Generator().manual_seed(5))[None]},
                     embeddings / "too-wide.safetensors")
    return checkpoint, diffusers_folder(checkpoint, folder / "diffusers"), embeddings


def _sd1_reference(folder, embedding):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipeline_tiny import SD_SCHEDULER

    reference = StableDiffusionPipeline(**diffusers_components(folder), scheduler=DDIMScheduler(**SD_SCHEDULER),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    reference.load_textual_inversion(str(embedding), token="mystyle")
    return reference


def test_a1111_embedding_gives_the_text_encoder_output_of_diffusers_load_textual_inversion(sd1):
    checkpoint, folder, embeddings = sd1
    reference = _sd1_reference(folder, embeddings / "mystyle.pt")
    plain = "a mystyle photo of a red circle, blue"  # diffusers has no emphasis syntax
    with torch.no_grad():
        theirs = reference.encode_prompt(plain, "cpu", 1, False)[0]
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, embeddings_dir=embeddings)
    ours = pipe.encode_prompts([plain])
    without = Pipeline.from_checkpoint(checkpoint, progress=False).encode_prompts([plain])
    assert (ours - without).abs().max() > 0.1 * without.abs().max()  # the name became its vectors
    assert_close_to_reference(ours, theirs)


def test_embedding_used_by_name_in_a_prompt_records_its_hash_and_a_misfit_is_named(sd1):
    checkpoint, _folder, embeddings = sd1
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, embeddings_dir=embeddings)
    result = pipe.txt2img(PROMPT, negative_prompt="mystyle", width=32, height=32, steps=2, seed=1)
    digest = hashlib.sha256((embeddings / "mystyle.pt").read_bytes()).hexdigest()[:12]  # A1111's: the whole file's
    assert result.parameters[0].endswith(f'TI hashes: "mystyle: {digest}"')
    with pytest.raises(ValueError, match=r"embedding 'too-wide' \(.*too-wide.safetensors\) does not fit .*32 wide.*64 wide"):
        pipe.txt2img("a too-wide circle", width=32, height=32, steps=2, seed=1)
    assert read_embedding(embeddings / "mystyle.pt").info == {"step": 1200, "sd_checkpoint": "abcdef12",
                                                              "sd_checkpoint_name": "model"}


def test_embedding_vectors_stay_in_one_77_token_window(sd1):
    checkpoint, _folder, embeddings = sd1
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, embeddings_dir=embeddings)
    encoder = pipe.text.prompt_encoders[0]
    pipe.encode_prompts(["x"])  # gives the encoders the embeddings
    # 74 words, then the 3-vector embedding: it starts the second window instead of straddling two.
    chunks = encoder._chunker("dog " * 74 + "mystyle")
    assert len(chunks) == 2 and chunks[1].tokens[1:4] == [49408, 49409, 49410]


def test_sdxl_embedding_gives_both_encoders_their_vectors_as_diffusers_does(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from pipeline_tiny import SD_SCHEDULER

    checkpoint = write_checkpoint(TINY_SDXL, tmp_path / "xl.safetensors")
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    generator = torch.Generator().manual_seed(8)
    state = {"clip_l": torch.randn(2, 64, generator=generator), "clip_g": torch.randn(2, 64, generator=generator)}
    save_safetensors(state, embeddings / "xlstyle.safetensors")
    reference = StableDiffusionXLPipeline(**sdxl_components(diffusers_folder(checkpoint, tmp_path / "d")),
                                          scheduler=EulerDiscreteScheduler(**SD_SCHEDULER))
    reference.load_textual_inversion(state["clip_l"], token="xlstyle", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(state["clip_g"], token="xlstyle", text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    prompt = "an xlstyle picture of a square"
    with torch.no_grad():
        theirs = reference.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
    ours = Pipeline.from_checkpoint(checkpoint, progress=False, embeddings_dir=embeddings).encode_prompts([prompt])
    assert_close_to_reference(ours, theirs)


def test_files_that_are_not_embeddings_are_named(tmp_path):
    path = tmp_path / "two.safetensors"
    save_safetensors({"a": torch.randn(2, 4), "b": torch.randn(2, 4)}, path)
    with pytest.raises(CheckpointError, match="two.safetensors: not a textual-inversion embedding"):
        read_embedding(path)
    cut = tmp_path / "cut.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}}, cut)
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.pt: truncated or corrupt"):
        read_embedding(cut)
