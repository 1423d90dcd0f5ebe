"""SDXL end to end against diffusers' SDXL pipelines, built from the same tiny random weights.

Our single files are converted into diffusers folders by our converter and loaded by diffusers;
both sides get the same prompts (tokenised by our tokenizer and transformers' on one vocabulary),
the same initial noise and generators; images must agree within 2/255 per pixel.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from latent_diffusion.checkpoints.convert import load_diffusers_folder, save_diffusers_folder
from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.checkpoints.load import load_checkpoint
from latent_diffusion.diffusion.sampling import BatchNoise, make_generators
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.pipelines.refiner import Refiner
from latent_diffusion.pipelines.text_conditioning import MicroConditioning
from test_pipeline_oracle import TOLERANCE, _as_array as _array, _assert_images_match
from pipeline_tiny import (
    SD_SCHEDULER, TINY_SD1, TINY_SDXL, TINY_SDXL_REFINER, diffusers_folder, sdxl_components, write_checkpoint,
)

diffusers = pytest.importorskip("diffusers")
PROMPT = "a red circle above a blue square"
SEED, BATCH, SIZE, STEPS = 3, 2, 32, 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return (write_checkpoint(TINY_SDXL, folder / "xl.safetensors"),
            write_checkpoint(TINY_SDXL_REFINER, folder / "xl-refiner.safetensors", seed=1), folder)


@pytest.fixture(scope="module")
def base(files):
    return Pipeline.from_checkpoint(files[0], progress=False)


@pytest.fixture(scope="module")
def refiner(files):
    return Pipeline.from_checkpoint(files[1], progress=False)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="linspace")


def _reference(cls, path, folder, **options):
    pipe = cls(**sdxl_components(diffusers_folder(path, folder)), scheduler=_scheduler(), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise():
    generators = make_generators(SEED, BATCH)
    return BatchNoise(generators).randn((BATCH, 4, SIZE // 4, SIZE // 4)), generators


@pytest.mark.parametrize("negative", ["blurry", ""])
def test_txt2img_matches_stable_diffusion_xl_pipeline(base, files, negative):
    from diffusers import StableDiffusionXLPipeline

    reference = _reference(StableDiffusionXLPipeline, files[0], files[2] / "xl-diffusers")
    ours = base.txt2img(PROMPT, negative_prompt=negative, width=SIZE, height=SIZE, steps=STEPS, sampler="euler",
                        guidance_scale=5.0, seed=SEED, batch_size=BATCH)
    latents, generators = _noise()
    with torch.no_grad():
        # An empty negative prompt is zeros on both sides (A1111's rule; diffusers' force_zeros_for_empty_prompt).
        theirs = reference([PROMPT] * BATCH, negative_prompt=[negative] * BATCH if negative else None,
                           height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
                           latents=latents, generator=generators, output_type="np").images
    _assert_images_match(ours.images, theirs)
    if negative:
        other = base.txt2img("a red circle above a green square", negative_prompt=negative, width=SIZE, height=SIZE,
                             steps=STEPS, sampler="euler", guidance_scale=5.0, seed=SEED)
        assert np.abs(_array(other.images) - theirs[:1]).max() > 2 * TOLERANCE


def test_size_conditioning_matches_diffusers_and_changes_the_image(base, files):
    from diffusers import StableDiffusionXLPipeline

    reference = _reference(StableDiffusionXLPipeline, files[0], files[2] / "xl-diffusers-size")
    micro = MicroConditioning(original_size=(1024, 768), crop_top_left=(16, 8), target_size=(512, 512))
    ours = base.txt2img(PROMPT, negative_prompt="blurry", width=SIZE, height=SIZE, steps=STEPS, sampler="euler",
                        guidance_scale=5.0, seed=SEED, batch_size=BATCH, micro_conditioning=micro)
    latents, generators = _noise()
    with torch.no_grad():
        theirs = reference([PROMPT] * BATCH, negative_prompt=["blurry"] * BATCH, height=SIZE, width=SIZE,
                           num_inference_steps=STEPS, guidance_scale=5.0, latents=latents, generator=generators,
                           original_size=(768, 1024), crops_coords_top_left=(16, 8), target_size=(512, 512),
                           output_type="np").images
    _assert_images_match(ours.images, theirs)
    default = base.txt2img(PROMPT, negative_prompt="blurry", width=SIZE, height=SIZE, steps=STEPS, sampler="euler",
                           guidance_scale=5.0, seed=SEED)
    assert np.abs(_array(default.images) - theirs[:1]).max() > 2 * TOLERANCE
    assert "Original size: 1024x768" in ours.parameters[0] and "Crop top: 16, Crop left: 8" in ours.parameters[0]


def test_base_then_refiner_matches_diffusers_denoising_end_and_start(base, refiner, files):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    first = _reference(StableDiffusionXLPipeline, files[0], files[2] / "xl-diffusers-base")
    second = _reference(StableDiffusionXLImg2ImgPipeline, files[1], files[2] / "xl-diffusers-refiner",
                        text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                        force_zeros_for_empty_prompt=True)
    switch, steps = 0.7, 6
    ours = base.txt2img(PROMPT, negative_prompt="blurry", width=SIZE, height=SIZE, steps=steps, sampler="euler",
                        guidance_scale=5.0, seed=SEED, batch_size=BATCH, refiner=Refiner(refiner, switch))
    latents, generators = _noise()
    options = dict(negative_prompt=["blurry"] * BATCH, num_inference_steps=steps, guidance_scale=5.0,
                   generator=generators)
    with torch.no_grad():
        handed_over = first([PROMPT] * BATCH, height=SIZE, width=SIZE, latents=latents, output_type="latent",
                            denoising_end=switch, **options).images
        theirs = second([PROMPT] * BATCH, image=handed_over, denoising_start=switch, output_type="np",
                        **options).images
    _assert_images_match(ours.images, theirs)
    alone = base.txt2img(PROMPT, negative_prompt="blurry", width=SIZE, height=SIZE, steps=steps, sampler="euler",
                         guidance_scale=5.0, seed=SEED)
    assert np.abs(_array(alone.images) - theirs[:1]).max() > 2 * TOLERANCE
    assert "Refiner: xl-refiner [" in ours.parameters[0] and "Refiner switch at: 0.7" in ours.parameters[0]


def test_img2img_matches_stable_diffusion_xl_img2img_pipeline(base, files):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    reference = _reference(StableDiffusionXLImg2ImgPipeline, files[0], files[2] / "xl-diffusers-img2img")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    ours = base.img2img(PROMPT, image, negative_prompt="blurry", steps=8, sampler="euler", guidance_scale=5.0,
                        strength=0.6, seed=SEED, batch_size=BATCH)
    with torch.no_grad():
        # diffusers' SDXL img2img conditions on the aesthetic score only for refiners; sizes as ours.
        theirs = reference([PROMPT] * BATCH, image=image, negative_prompt=["blurry"] * BATCH, num_inference_steps=8,
                           strength=0.6, guidance_scale=5.0, generator=make_generators(SEED, BATCH),
                           output_type="np").images
    _assert_images_match(ours.images, theirs)


def test_bad_refiner_settings_are_clear_errors(base, refiner, files, tmp_path):
    with pytest.raises(ValueError, match="cannot start from noise.*--refiner"):
        refiner.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2)
    for switch in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            Refiner(refiner, switch)
    sd1 = Pipeline.from_checkpoint(write_checkpoint(TINY_SD1, tmp_path / "sd1.safetensors"), progress=False)
    with pytest.raises(ValueError, match="cannot continue the latents.*same family"):
        base.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, refiner=Refiner(sd1))
    with pytest.raises(ValueError, match="clip skip does not apply to SDXL"):
        base.txt2img(PROMPT, width=SIZE, height=SIZE, steps=2, clip_skip=2)


@pytest.mark.parametrize("which", [0, 1], ids=["base", "refiner"])
def test_diffusers_folder_round_trip_is_lossless(files, tmp_path, which):
    loaded = load_checkpoint(files[which])
    back = load_diffusers_folder(save_diffusers_folder(loaded, tmp_path / "folder"))
    assert back.spec.family == loaded.spec.family
    assert back.spec.unet == loaded.spec.unet and back.spec.conditioner == loaded.spec.conditioner
    ours, theirs = loaded.model.state_dict(), back.model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_folder_saved_by_diffusers_loads(files, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    saved = tmp_path / "saved-by-diffusers"
    _reference(StableDiffusionXLPipeline, files[0], tmp_path / "ours").save_pretrained(saved)
    loaded, original = load_diffusers_folder(saved), load_checkpoint(files[0])
    expected = original.model.state_dict()
    got = loaded.model.state_dict()
    # diffusers keeps no logit scale, which SDXL never uses: it comes back as NaN, named as such.
    unused = [k for k in expected if k.endswith("logit_scale")]
    assert unused and all(k in sum(loaded.set_aside.values(), []) for k in unused)
    assert all(torch.equal(expected[k], got[k]) for k in expected if k not in unused)


def test_sdxl_inpainting_model_loads_and_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image

    spec = dataclasses.replace(TINY_SDXL, family="sdxl-inpaint", conditioning="hybrid",
                               unet=dataclasses.replace(TINY_SDXL.unet, in_channels=9))
    path = write_checkpoint(spec, tmp_path / "xl-inpaint.safetensors", seed=2)
    pipe = Pipeline.from_checkpoint(path, progress=False)
    assert pipe.spec.family == "sdxl-inpaint"
    reference = _reference(StableDiffusionXLInpaintPipeline, path, tmp_path / "diffusers")
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    ours = pipe.inpaint(PROMPT, image, mask, negative_prompt="blurry", steps=STEPS, sampler="euler",
                        guidance_scale=5.0, seed=SEED, batch_size=BATCH)
    # We draw the masked image's posterior sample first from each generator, then the initial noise.
    generators = make_generators(SEED, BATCH)
    for generator in generators:
        torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=generator)
    latents = BatchNoise(generators).randn((BATCH, 4, SIZE // 4, SIZE // 4))
    with torch.no_grad():
        # One image per prompt, so that diffusers too samples each image's posterior with its own generator.
        theirs = reference([PROMPT] * BATCH, image=[image] * BATCH, mask_image=[mask] * BATCH,
                           negative_prompt=["blurry"] * BATCH,
                           height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0, strength=1.0,
                           latents=latents, generator=make_generators(SEED, BATCH), output_type="np").images
    _assert_images_match(ours.images, theirs)


def test_ldm_info_names_the_family_and_its_parts(files, capsys):
    from latent_diffusion.cli import main

    main(["info", str(files[0])])
    out = capsys.readouterr().out
    assert "family:      sdxl -" in out
    assert "text_encoder " in out and "CLIP ViT-L/14" in out and "text_encoder_2" in out and "ViT-bigG" in out
    main(["info", str(files[1])])
    assert "sdxl-refiner" in capsys.readouterr().out


def test_cli_txt2img_with_refiner_and_size_options(files, tmp_path, capsys):
    from latent_diffusion.cli import main
    from latent_diffusion.pipelines.png_info import parse_parameters, read_png_parameters

    out = tmp_path / "out"
    code = main(["txt2img", PROMPT, "-c", str(files[0]), "--refiner", str(files[1]), "--refiner-switch-at", "0.6",
                 "--original-size", "1024x768", "-W", "32", "-H", "32", "--steps", "3", "--sampler", "euler",
                 "--seed", "4", "-o", str(out), "-q"])
    assert code in (None, 0)
    (image,) = out.glob("*.png")
    _, _, settings = parse_parameters(read_png_parameters(image))
    assert settings["Refiner switch at"] == "0.6" and settings["Original size"] == "1024x768"
    assert settings["CFG scale"] == "5"  # the SDXL family's default guidance
    command = ["txt2img", PROMPT, "-c", str(files[0]), "--refiner", str(files[1]), "-o", str(out)]
    assert main([*command, "--refiner-switch-at", "1"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--original-size", "big"])
    assert "AxB" in capsys.readouterr().err
    assert main([*command[:-2], "--refiner", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "refiner not found" in capsys.readouterr().err


def _psnr(a, b) -> float:
    a, b = _array(a), _array(b)
    return float(10 * np.log10(1 / max(np.mean((a - b) ** 2), 1e-12)))


@pytest.mark.parametrize("mode", ["lean", "tiled_vae", "bf16"])
def test_run_modes_work_for_sdxl_with_a_refiner(files, base, refiner, mode):
    from latent_diffusion.nn.bf16 import has_native_bf16

    if mode == "bf16" and not has_native_bf16("cpu"):
        pytest.skip("this CPU has no native bfloat16")
    options = dict(negative_prompt="blurry", width=SIZE, height=SIZE, steps=4, sampler="dpmpp_2m", seed=SEED)
    exact = base.txt2img(PROMPT, refiner=Refiner(refiner, 0.6), **options)
    fast_base = Pipeline.from_checkpoint(files[0], progress=False, **{mode: True})
    fast_refiner = Pipeline.from_checkpoint(files[1], progress=False, **{mode: True})
    fast = fast_base.txt2img(PROMPT, refiner=Refiner(fast_refiner, 0.6), **options)
    # Tiled decoding is exact; lean and bf16 round the weights or the arithmetic.
    assert _psnr(exact.images, fast.images) >= {"lean": 40, "tiled_vae": 80, "bf16": 30}[mode]


def test_separate_sdxl_vae_file_replaces_the_autoencoder(files, tmp_path):
    from latent_diffusion.checkpoints.io import save_safetensors
    from pipeline_tiny import random_state

    vae = {k.removeprefix("first_stage_model."): v for k, v in random_state(TINY_SDXL, seed=7).items()
           if k.startswith("first_stage_model.")}
    save_safetensors(vae, tmp_path / "sdxl_vae.safetensors")
    pipe = Pipeline.from_checkpoint(files[0], vae=tmp_path / "sdxl_vae.safetensors", progress=False)
    assert torch.equal(pipe.model.first_stage_model.state_dict()["decoder.conv_out.weight"], vae["decoder.conv_out.weight"])


def test_api_refiner_checkpoint_and_switch_match_the_python_api(files, base, refiner):
    import httpx

    from latent_diffusion.server.app import ServerConfig
    from server_fixtures import png_from_b64, running_server

    folder = files[2]
    payload = dict(prompt=PROMPT, negative_prompt="blurry", width=SIZE, height=SIZE, steps=4, sampler_name="Euler",
                   cfg_scale=5.0, seed=SEED, refiner_checkpoint="xl-refiner.safetensors", refiner_switch_at=0.6)
    expected = base.txt2img(PROMPT, negative_prompt="blurry", width=SIZE, height=SIZE, steps=4, sampler="euler",
                            guidance_scale=5.0, seed=SEED, refiner=Refiner(refiner, 0.6))
    with running_server(ServerConfig(checkpoint=files[0], models_dir=folder)) as url:
        answer = httpx.post(f"{url}/sdapi/v1/txt2img", json=payload, timeout=300)
        assert answer.status_code == 200, answer.text
        image = png_from_b64(answer.json()["images"][0])
        assert np.array_equal(np.asarray(image), np.asarray(expected.images[0]))
        assert "Refiner switch at: 0.6" in answer.json()["info"]
        bad = [({**payload, "refiner_checkpoint": "nothing.safetensors"}, 400, "unknown model"),
               ({**payload, "refiner_switch_at": 1.0}, 422, "refiner_switch_at"),
               ({**payload, "refiner_checkpoint": "xl.safetensors", "override_settings":
                 {"sd_model_checkpoint": "xl-refiner.safetensors"}}, 400, "cannot start from noise")]
        for body, status, message in bad:
            refused = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=300)
            assert refused.status_code == status and message in refused.json()["detail"], refused.text
