"""The Python API: seeds, prompts, inpainting by blending, tiling, half precision, VAE files, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.pipelines.common import Pipeline, default_checkpoint_path
from latent_diffusion.pipelines.png_info import parse_parameters
from pipeline_tiny import TINY_SD1, TINY_X4, random_state, write_checkpoint

SMALL = dict(width=32, height=32, steps=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("sd1") / "tiny.safetensors")


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return Pipeline.from_checkpoint(checkpoint, progress=False)


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    path = write_checkpoint(TINY_X4, tmp_path_factory.mktemp("x4") / "x4.safetensors")
    return Pipeline.from_checkpoint(path, progress=False)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _image(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_an_image_is_the_same_alone_in_a_batch_or_in_a_later_batch(pipe):
    batched = pipe.txt2img("a circle", seed=10, batch_size=3, sampler="euler_a", **SMALL)
    alone = pipe.txt2img("a circle", seed=12, batch_size=1, sampler="euler_a", **SMALL)
    counted = pipe.txt2img("a circle", seed=10, batch_size=1, batch_count=3, sampler="euler_a", **SMALL)
    assert batched.seeds == counted.seeds == [10, 11, 12]
    # Same noise; batched matrix products may round differently in the last bits, hence one level.
    assert np.abs(_array(batched.images[2]) - _array(alone.images[0])).max() <= 1
    assert np.array_equal(_array(counted.images[2]), _array(alone.images[0]))
    assert not np.array_equal(_array(batched.images[0]), _array(batched.images[1]))


def test_parameters_text_regenerates_the_image(pipe):
    first = pipe.txt2img("a (red:1.3) [blue] circle", negative_prompt="dull", seed=77, guidance_scale=5.5,
                         sampler="DPM++ 2M Karras", clip_skip=2, **SMALL)
    prompt, negative, settings = parse_parameters(first.parameters[0])
    width, height = (int(v) for v in settings["Size"].split("x"))
    # A1111 1.9+ writes the old combined name as a sampler and a schedule type.
    assert (settings["Sampler"], settings["Schedule type"]) == ("DPM++ 2M", "Karras")
    again = pipe.txt2img(prompt, negative_prompt=negative, width=width, height=height, steps=int(settings["Steps"]),
                         sampler=settings["Sampler"], scheduler=settings["Schedule type"],
                         guidance_scale=float(settings["CFG scale"]), seed=int(settings["Seed"]),
                         clip_skip=int(settings["Clip skip"]))
    assert np.array_equal(_array(first.images[0]), _array(again.images[0]))
    assert settings["Model hash"] == pipe.hash and settings["Model"] == "tiny"


def test_long_prompts_are_chunked_and_the_tail_matters(pipe):
    words = ", ".join(["red circle"] * 40)
    assert pipe.encode_prompts([words]).shape[1] == 2 * 77
    with_tail = pipe.txt2img(words + ", green triangle", seed=1, sampler="euler", **SMALL)
    without = pipe.txt2img(words, seed=1, sampler="euler", **SMALL)
    assert not np.array_equal(_array(with_tail.images[0]), _array(without.images[0]))


def test_clip_skip_and_negative_prompt_change_the_image(pipe):
    base = pipe.txt2img("a square", seed=4, sampler="euler", **SMALL)
    skipped = pipe.txt2img("a square", seed=4, sampler="euler", clip_skip=2, **SMALL)
    negative = pipe.txt2img("a square", negative_prompt="a circle", seed=4, sampler="euler", **SMALL)
    assert not np.array_equal(_array(base.images[0]), _array(skipped.images[0]))
    assert not np.array_equal(_array(base.images[0]), _array(negative.images[0]))


def test_inpainting_an_ordinary_model_keeps_the_unmasked_pixels_exactly_when_asked(pipe):
    image = _image(32)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[4:20, 12:28] = 255
    result = pipe.inpaint("a star", image, Image.fromarray(mask), mask_blur=2, mask_padding=1, keep_unmasked=True,
                          seed=3, sampler="euler", steps=3)
    out, original = _array(result.images[0]), _array(image)
    # Far enough from the hole that padding and blur leave the mask at exactly 0.
    far = np.ones((32, 32), dtype=bool)
    far[0:26, 6:32] = False
    assert np.array_equal(out[far], original[far])
    assert np.abs(out[6:18, 14:26] - original[6:18, 14:26]).mean() > 5
    assert "Mask blur: 2" in result.parameters[0]


def test_tiled_upscaling_covers_the_image_and_one_tile_equals_no_tiling(x4):
    image = _image(24, seed=2)
    kwargs = dict(prompt="sharp", steps=2, sampler="euler", seed=5, noise_level=30)
    whole = x4.upscale(image, **kwargs)
    one_tile = x4.upscale(image, tile_size=24, **kwargs)
    tiled = x4.upscale(image, tile_size=16, tile_overlap=8, **kwargs)
    assert whole.images[0].size == tiled.images[0].size == (96, 96)
    assert np.array_equal(_array(whole.images[0]), _array(one_tile.images[0]))
    assert "Noise level: 30" in tiled.parameters[0]


def test_half_precision_decodes_in_fp32_when_the_vae_overflows(checkpoint):
    half = Pipeline.from_checkpoint(checkpoint, half=True, progress=False)
    assert half.dtype == torch.float16
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        # Large enough to overflow float16 (max 65504) in the first decoder activations, harmless in fp32.
        half.model.first_stage_model.post_quant_conv.weight.mul_(3e4)
    warnings: list[str] = []
    images = half.decode(latents, warnings)
    assert torch.isfinite(images).all()
    assert warnings and "fp32" in warnings[0]


def test_a_separate_vae_file_replaces_the_autoencoder(tmp_path, checkpoint):
    other = random_state(TINY_SD1, seed=5)
    vae = {k[len("first_stage_model."):]: v for k, v in other.items() if k.startswith("first_stage_model.")}
    save_safetensors({**vae, "loss.logvar": torch.zeros(())}, tmp_path / "vae.safetensors")
    pipe = Pipeline.from_checkpoint(checkpoint, vae=tmp_path / "vae.safetensors", progress=False)
    for key, value in pipe.model.first_stage_model.state_dict().items():
        assert torch.equal(value, vae[key]), key
    del vae["decoder.conv_out.bias"]
    save_safetensors(vae, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        Pipeline.from_checkpoint(checkpoint, vae=tmp_path / "broken.safetensors", progress=False)


def test_without_a_built_in_model_the_error_says_to_pass_a_checkpoint():
    try:
        path = default_checkpoint_path()
    except FileNotFoundError as error:
        assert "--checkpoint" in str(error)
    else:
        assert path.is_file()


@pytest.mark.parametrize("call, message", [
    (lambda p: p.txt2img("x", width=36, height=32, steps=1), "multiple of 8"),
    (lambda p: p.txt2img("x", steps=0, **{k: v for k, v in SMALL.items() if k != "steps"}), "steps"),
    (lambda p: p.txt2img("x", sampler="nope", **SMALL), "unknown sampler"),
    (lambda p: p.txt2img("x", scheduler="wobbly", **SMALL), "unknown scheduler 'wobbly'.*karras \\(Karras\\)"),
    (lambda p: p.img2img("x", _image(32), sampler="DPM++ 2M Karras", scheduler="Beta", steps=1), "already chooses"),
    (lambda p: p.txt2img("x", batch_size=0, **SMALL), "batch size"),
    (lambda p: p.img2img("x", _image(32), strength=0.0, steps=1), "strength"),
    (lambda p: p.img2img("x", None, steps=1), "init image"),
    (lambda p: p.inpaint("x", _image(32), Image.new("L", (24, 24)), steps=1), "does not match"),
    (lambda p: p.upscale(_image(16), "x", steps=1), "super-resolution"),
    (lambda p: p.sample(class_ids=[1], **SMALL), "class-conditional and unconditional"),
])
def test_bad_input_is_a_clear_value_error(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


def test_half_precision_weights_give_nearly_the_fp32_image(checkpoint, pipe):
    kwargs = dict(negative_prompt="x", sampler="euler", seed=1, **SMALL)
    half = Pipeline.from_checkpoint(checkpoint, half=True, progress=False).txt2img("a (red:1.2) circle", **kwargs)
    full = pipe.txt2img("a (red:1.2) circle", **kwargs)
    assert np.abs(_array(half.images[0]) - _array(full.images[0])).max() <= 16


def _vq_pipeline(unet_in: int, conditioning: str) -> Pipeline:
    import dataclasses

    from latent_diffusion.checkpoints.load import load_state_dict_into_model
    from latent_diffusion.config import LDM_BSR_SR

    spec = dataclasses.replace(
        LDM_BSR_SR, family="custom", conditioning=conditioning,
        unet=dataclasses.replace(LDM_BSR_SR.unet, in_channels=unet_in, model_channels=32, channel_mult=(1, 2),
                                 num_res_blocks=1, attention_resolutions=(2,)),
        autoencoder=dataclasses.replace(LDM_BSR_SR.autoencoder, ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=16),
    )
    return Pipeline(load_state_dict_into_model(random_state(spec), spec=spec), progress=False)


def test_ldm_super_resolution_concatenates_the_low_res_image_without_text():
    pipe = _vq_pipeline(6, "concat")
    low = _image(16, seed=1)
    result = pipe.upscale(low, steps=2, sampler="euler", seed=0)
    other = pipe.upscale(_image(16, seed=2), steps=2, sampler="euler", seed=0)
    assert result.images[0].size == (32, 32)  # the tiny VQ autoencoder downsamples by 2
    assert not np.array_equal(_array(result.images[0]), _array(other.images[0]))  # the input matters
    with pytest.raises(ValueError, match="use inpaint or upscale"):
        pipe.txt2img("x", **SMALL)


def test_unconditional_sampling_takes_no_classes():
    pipe = _vq_pipeline(3, "none")
    result = pipe.sample(width=16, height=16, steps=2, seed=3, batch_size=2)
    assert [image.size for image in result.images] == [(16, 16)] * 2 and result.seeds == [3, 4]
    with pytest.raises(ValueError, match="unconditional"):
        pipe.sample(class_ids=[1], width=16, height=16, steps=1)


def test_masks_read_white_or_opaque_strokes_as_the_hole():
    from latent_diffusion.pipelines.inpaint import prepare_mask

    grey = np.zeros((8, 8), dtype=np.uint8)
    grey[2:5, 2:5] = 255
    expected = torch.from_numpy(grey / 255.0).float()[None, None]
    opaque_rgba = Image.fromarray(np.dstack([grey] * 3 + [np.full((8, 8), 255, np.uint8)]))
    strokes = Image.fromarray(np.dstack([np.zeros((8, 8, 3), np.uint8), grey]))
    for mask in (Image.fromarray(grey), opaque_rgba, strokes):
        assert torch.equal(prepare_mask(mask, (8, 8), blur=0, padding=0), expected)
    padded = prepare_mask(Image.fromarray(grey), (8, 8), blur=0, padding=1)
    assert padded.sum() == 25 and padded[0, 0, 1, 1] == 1


def test_step_callback_is_per_request_and_sees_every_step(pipe):
    seen = []
    pipe.txt2img("a circle", seed=1, sampler="euler", step_callback=lambda step, total: seen.append((step.index, total)),
                 **SMALL)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    # Nothing is left on the shared pipeline: the next request reports to nobody.
    assert not hasattr(pipe, "step_callback")
    with pytest.raises(KeyboardInterrupt):
        def stop(step, total):
            raise KeyboardInterrupt
        pipe.txt2img("a circle", seed=1, step_callback=stop, **SMALL)


# The combined names the sampler registry listed before schedulers were chosen apart.
OLD_KARRAS_NAMES = {"lms_karras": "lms", "DPM++ 2S a Karras": "dpmpp_2s_ancestral", "dpmpp_2m_karras": "dpmpp_2m",
                    "DPM++ 2M Karras": "dpmpp_2m", "DPM++ 2M SDE Karras": "dpmpp_2m_sde"}


@pytest.mark.parametrize("old_name", sorted(OLD_KARRAS_NAMES))
def test_old_combined_sampler_names_give_bitwise_the_old_images(pipe, old_name):
    from latent_diffusion.diffusion.registry import SAMPLERS, SamplerSpec
    from latent_diffusion.diffusion.sampling import BatchNoise, make_generators
    from latent_diffusion.pipelines.common import SamplingSettings

    # The old registry entry, run on the sampler's own-schedule path: make_sigmas(spacing="karras").
    sampler = SAMPLERS[OLD_KARRAS_NAMES[old_name]]
    old_entry = SamplerSpec(old_name, old_name, sampler.function, spacing="karras", stochastic=sampler.stochastic)
    cond, uncond = pipe.text_conditioning("a red circle", "", 2, None, width=32, height=32)
    latents = pipe.sample_latents(SamplingSettings(old_entry, 4, 7.5), BatchNoise(make_generators(9, 2)), cond,
                                  uncond, shape=pipe.latent_shape(2, 32, 32))
    old_images = pipe.to_images(latents, [])
    new = pipe.txt2img("a red circle", sampler=old_name, seed=9, batch_size=2, guidance_scale=7.5, **{**SMALL, "steps": 4})
    split = pipe.txt2img("a red circle", sampler=sampler.label, scheduler="Karras", seed=9, batch_size=2,
                         guidance_scale=7.5, **{**SMALL, "steps": 4})
    for old_image, image, split_image in zip(old_images, new.images, split.images):
        assert np.array_equal(_array(image), _array(old_image))
        assert np.array_equal(_array(split_image), _array(old_image))
    automatic = pipe.txt2img("a red circle", sampler=sampler.name, seed=9, guidance_scale=7.5, **{**SMALL, "steps": 4})
    assert not np.array_equal(_array(automatic.images[0]), _array(old_images[0]))


def test_every_task_takes_a_scheduler_and_writes_its_schedule_type(pipe, x4):
    image, mask = _image(32), Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    unconditional = _vq_pipeline(3, "none")
    runs = {
        "txt2img": lambda **kw: pipe.txt2img("a star", **SMALL, **kw),
        "img2img": lambda **kw: pipe.img2img("a star", image, steps=4, strength=0.8, **kw),
        "inpaint": lambda **kw: pipe.inpaint("a star", image, mask, steps=3, **kw),
        "upscale": lambda **kw: x4.upscale(_image(16, seed=2), "sharp", steps=3, noise_level=30, **kw),
        "sample": lambda **kw: unconditional.sample(width=16, height=16, steps=3, **kw),
    }
    for task, run in runs.items():
        automatic = run(sampler="euler", seed=2)
        scheduled = run(sampler="euler", scheduler="exponential", seed=2)
        assert "Schedule type" not in automatic.parameters[0], task
        assert "Sampler: Euler, Schedule type: Exponential, CFG scale" in scheduled.parameters[0], task
        if task != "sample":  # the tiny VQ autoencoder snaps both latents to the same codes
            assert not np.array_equal(_array(automatic.images[0]), _array(scheduled.images[0])), task


def test_align_your_steps_takes_the_table_of_the_model_family(pipe, monkeypatch):
    from latent_diffusion.families import get_family

    def visited(family: str) -> list[float]:
        # The family object says which table its models take (the tiny model keeps its own weights).
        monkeypatch.setattr(pipe, "family", get_family(family))
        steps = []
        pipe.txt2img("a star", sampler="euler", scheduler="Align Your Steps", seed=1, width=32, height=32, steps=10,
                     step_callback=lambda step, total: steps.append(step.sigma))
        return steps

    # The published 10-step levels (Sabour et al. 2024), without the last, which a run replaces by 0.
    sd15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152]
    sdxl = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113]
    np.testing.assert_allclose(visited("sd1"), sd15, rtol=1e-12)
    np.testing.assert_allclose(visited("sdxl"), sdxl, rtol=1e-12)
    np.testing.assert_allclose(visited("sd2"), sd15, rtol=1e-12)


def test_tiled_vae_also_encodes_in_bands_with_the_same_result(checkpoint, pipe, monkeypatch):
    from latent_diffusion.models import vae_tiling

    tiled = Pipeline.from_checkpoint(checkpoint, progress=False, tiled_vae=True)
    calls = []
    original = vae_tiling.encode_tiled
    monkeypatch.setattr("latent_diffusion.pipelines.common.encode_tiled",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    options = dict(seed=3, steps=3, strength=0.7, sampler="euler")
    banded = tiled.img2img("a circle", _image(32), **options)
    whole = pipe.img2img("a circle", _image(32), **options)
    assert calls  # the init image was encoded in bands
    assert np.abs(_array(banded.images[0]) - _array(whole.images[0])).max() <= 1
