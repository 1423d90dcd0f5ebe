"""The hires fix: A1111's sizes and parameters, the CLI on the built-in model, and refusals of bad input.

Its images are checked against diffusers' txt2img + img2img in test_pipeline_oracle.py.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.cli import main
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.pipelines.hires import HiresFix, target_sizes
from latent_diffusion.pipelines.png_info import parse_parameters, read_png_parameters


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("options,first,enlarged,final", [
    (dict(scale=2), (512, 768), (1024, 1536), (1024, 1536)),
    (dict(scale=1.3), (512, 512), (664, 664), (664, 664)),  # int(665.6) rounded down to whole latents
    (dict(resize_x=1024), (512, 768), (1024, 1536), (1024, 1536)),  # one side keeps the aspect ratio
    (dict(resize_y=1024), (512, 768), (680, 1024), (680, 1024)),  # 682 rounded down
    (dict(resize_x=1024, resize_y=1024), (512, 768), (1024, 1536), (1024, 1024)),  # cover, then the centre
    (dict(resize_x=1536, resize_y=1024), (512, 512), (1536, 1536), (1536, 1024)),
])
def test_target_sizes_follow_a1111(options, first, enlarged, final):
    assert target_sizes(HiresFix(**options), *first, multiple=8) == (enlarged, final)


# ---------------------------------------------------------------------------------------------- the CLI
def _only_png(folder):
    files = sorted(folder.glob("*.png"))
    assert len(files) == 1, files
    return files[0]


def test_cli_hires_fix_on_the_builtin_model_records_and_restores_its_parameters(tmp_path, capsys):
    code = main(["txt2img", "a red circle", "--seed", "5", "--steps", "4", "--hires-scale", "2",
                 "--hires-upscaler", "Latent", "--hires-steps", "3", "--hires-denoise", "0.5",
                 "-o", str(tmp_path / "first"), "-q"])
    assert code == 0, capsys.readouterr().err
    made = _only_png(tmp_path / "first")
    with Image.open(made) as image:
        assert image.size == (128, 128)  # the built-in model's 64 px, twice
        pixels = np.asarray(image.convert("RGB"))
    prompt, _, settings = parse_parameters(read_png_parameters(made))
    assert prompt == "a red circle"
    assert {k: settings.get(k) for k in ("Size", "Hires upscale", "Hires steps", "Hires upscaler",
                                          "Denoising strength")} == {
        "Size": "64x64", "Hires upscale": "2", "Hires steps": "3", "Hires upscaler": "Latent",
        "Denoising strength": "0.5"}

    # --from-png restores the hires fix: the same picture again.
    assert main(["txt2img", "--from-png", str(made), "-o", str(tmp_path / "again"), "-q"]) == 0
    again = _only_png(tmp_path / "again")
    assert read_png_parameters(again) == read_png_parameters(made)
    with Image.open(again) as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels)


HIRES_CLI_ERRORS = [
    (["--hires-scale", "1"], "above 1 and at most 4, got 1.0"),
    (["--hires-scale", "9"], "above 1 and at most 4, got 9.0"),
    (["--hires-scale", "2", "--hires-upscaler", "ESRGAN_4x"],
     "unknown hires upscaler 'ESRGAN_4x'; choose one of 'Latent', 'Latent (antialiased)'"),
    (["--hires-scale", "2", "--hires-denoise", "-0.1"], "denoising strength must be in [0, 1], got -0.1"),
    (["--hires-scale", "2", "--hires-denoise", "1.5"], "denoising strength must be in [0, 1], got 1.5"),
    (["--hires-width", "100"], "hires width (resize_x) must be 0 (unset) or a multiple of 8 pixels, got 100"),
    (["--hires-steps", "3"], "--hires-steps needs --hires-scale or --hires-width/--hires-height"),
    (["--hires-scale", "2", "--hires-sampler", "Magic"], "hires sampler/scheduler: unknown sampler 'Magic'"),
    (["-W", "64", "-H", "64", "--hires-width", "512"], "enlarges by at most 4x; resize 512x0 makes 512x512"),
    (["-W", "64", "-H", "64", "--hires-width", "64", "--hires-height", "48"], "must enlarge the first pass's 64x64"),
]


@pytest.mark.parametrize("options,words", HIRES_CLI_ERRORS, ids=[w for _, w in HIRES_CLI_ERRORS])
def test_cli_refuses_bad_hires_options_before_loading_a_model(tmp_path, capsys, monkeypatch, options, words):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(Pipeline, "from_checkpoint", no_loading)
    assert main(["txt2img", "a red circle", *options, "-o", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert words in error and error.count("\n") == 1, error
    assert not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------------------------- the Python API
@pytest.mark.parametrize("options,words", [
    (dict(scale=0.5), "above 1"),
    (dict(scale=float("nan")), "above 1"),
    (dict(scale=1000), "at most 4"),
    (dict(steps=-1), "hires steps must be a whole number in [0, 1000]"),
    (dict(denoising_strength=float("nan")), "[0, 1]"),
    (dict(resize_y=-8), "hires height (resize_y)"),
    (dict(upscaler="Bilinear"), "'Latent (nearest-exact)', 'None', 'Lanczos', 'Nearest'"),
    (dict(upscaler=object()), "must be a super-resolution Pipeline"),
    (dict(sampler="DPM++ 2M Karras", scheduler="exponential"), "already chooses the Karras scheduler"),
])
def test_hires_fix_refuses_bad_settings(options, words):
    with pytest.raises(ValueError) as error:
        HiresFix(**options)
    assert words in str(error.value)


def test_the_builtin_upscaler_refuses_the_builtin_models_64_px_images():
    from latent_diffusion.pipelines.common import default_upscaler_path

    pipe, upscaler = Pipeline.from_checkpoint(progress=False), Pipeline.from_checkpoint(default_upscaler_path(), progress=False)
    pipe.sample_latents = lambda *args, **kwargs: pytest.fail("sampled before refusing")
    with pytest.raises(ValueError, match="trained on 16x16 inputs and recolours larger ones; the first pass is 64x64"):
        pipe.txt2img("a red circle", width=64, height=64, steps=2, hires=HiresFix(scale=4, upscaler=upscaler))


@pytest.fixture(scope="module")
def tiny_x2_upscaler():
    """A super-resolution model that enlarges 2x and takes inputs whose sides are multiples of 16."""
    from latent_diffusion.checkpoints.load import load_state_dict_into_model
    from pipeline_tiny import TINY_VAE, TINY_X4, random_state

    spec = dataclasses.replace(
        TINY_X4, autoencoder=dataclasses.replace(TINY_VAE, ch_mult=(1, 2)),
        unet=dataclasses.replace(TINY_X4.unet, channel_mult=(1, 1, 1, 1, 1), attention_resolutions=(16,),
                                 disable_self_attentions=None))
    return Pipeline(load_state_dict_into_model(dict(random_state(spec)), spec=spec), name="tiny-x2", progress=False)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    from pipeline_tiny import TINY_SD1, write_checkpoint

    path = write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors")
    return Pipeline.from_checkpoint(path, progress=False)


@pytest.mark.parametrize("size,scale,words", [
    (40, 2, "takes images whose sides are multiples of 16; the first pass is 40x40"),
    (32, 3, "enlarges 2x, so it cannot make 96x96 from 32x32; ask for at most 2x"),
])
def test_a_super_resolution_upscaler_refuses_what_it_cannot_do(tiny_sd1, tiny_x2_upscaler, size, scale, words):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    tiny_sd1.sample_latents = no_sampling  # an instance attribute: this module's pipeline only
    try:
        with pytest.raises(ValueError) as error:
            tiny_sd1.txt2img("a cat", width=size, height=size, steps=2,
                             hires=HiresFix(scale=scale, upscaler=tiny_x2_upscaler))
    finally:
        del tiny_sd1.sample_latents
    assert words in str(error.value)


def test_hires_parameters_name_what_differs_from_the_first_pass(tiny_sd1):
    hires = HiresFix(resize_x=64, resize_y=48, upscaler="Nearest", steps=0, denoising_strength=0.25,
                     sampler="DPM++ 2M Karras", prompt="a dog, sharp", negative_prompt="")
    result = tiny_sd1.txt2img("a cat", negative_prompt="blurry", width=32, height=32, steps=2, sampler="euler",
                              seed=3, hires=hires)
    assert result.images[0].size == (64, 48)
    _, negative, settings = parse_parameters(result.parameters[0])
    assert negative == "blurry"
    assert {k: v for k, v in settings.items() if k.startswith(("Hires", "Denoising"))} == {
        "Denoising strength": "0.25", "Hires sampler": "DPM++ 2M", "Hires schedule type": "Karras",
        "Hires prompt": "a dog, sharp", "Hires resize": "64x48", "Hires upscaler": "Nearest"}


def test_large_targets_decode_in_bands(tiny_sd1, monkeypatch):
    """Above the memory threshold the second pass decodes with the tiled VAE (the same image, bounded memory)."""
    from latent_diffusion.pipelines import hires as hires_module

    calls = []
    decode = Pipeline.decode

    def recording_decode(self, latents, warnings=None, *, tiled=None):
        calls.append((tuple(latents.shape[2:]), tiled))
        return decode(self, latents, warnings, tiled=tiled)

    monkeypatch.setattr(Pipeline, "decode", recording_decode)
    options = dict(width=32, height=32, steps=2, sampler="euler", seed=1,
                   hires=HiresFix(scale=2, upscaler="Lanczos", steps=1, denoising_strength=0.5))
    untiled = tiny_sd1.txt2img("a cat", **options).images[0]
    monkeypatch.setattr(hires_module, "AUTO_TILED_VAE_BYTES", 1)
    tiled = tiny_sd1.txt2img("a cat", **options).images[0]
    # The first pass's decode, then the second pass's: untiled, then banded.
    assert calls == [((8, 8), None), ((16, 16), False), ((8, 8), None), ((16, 16), True)]
    assert np.abs(np.asarray(tiled, dtype=int) - np.asarray(untiled, dtype=int)).max() <= 1


def test_from_png_reads_every_hires_setting(tmp_path):
    from latent_diffusion.cli import _build_parser
    from latent_diffusion.pipelines.commands import _check_hires, apply_png_parameters
    from latent_diffusion.pipelines.png_info import save_png

    text = ('a cat\nNegative prompt: blurry\nSteps: 12, Sampler: Euler, CFG scale: 5, Seed: 8, Size: 64x96, '
            'Denoising strength: 0.35, Hires sampler: DPM++ 2M, Hires schedule type: Karras, '
            'Hires prompt: "a cat, detailed", Hires negative prompt: noise, Hires resize: 0x192, Hires steps: 6, '
            'Hires upscaler: Latent (bicubic)')
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "made.png", text)
    args = _build_parser().parse_args(["txt2img", "--from-png", str(path), "--hires-scale", "3"])
    apply_png_parameters(args)
    assert (args.hires_scale, args.hires_width, args.hires_height) == (None, None, 192)
    assert (args.hires_upscaler, args.hires_steps, args.hires_denoise) == ("Latent (bicubic)", 6, 0.35)
    assert (args.hires_sampler, args.hires_scheduler) == ("DPM++ 2M", "Karras")
    assert (args.hires_prompt, args.hires_negative_prompt) == ("a cat, detailed", "noise")
    assert _check_hires(args) == "Latent (bicubic)"


def test_a_refiner_keeps_its_noise_levels_in_the_second_pass(tmp_path):
    """The refiner denoises every level below its switch point, in the first pass and in the second."""
    from latent_diffusion.pipelines.refiner import Refiner
    from pipeline_tiny import TINY_SDXL, TINY_SDXL_REFINER, write_checkpoint

    base = Pipeline.from_checkpoint(write_checkpoint(TINY_SDXL, tmp_path / "xl.safetensors"), progress=False)
    refiner = Pipeline.from_checkpoint(write_checkpoint(TINY_SDXL_REFINER, tmp_path / "xl-refiner.safetensors",
                                                        seed=1), progress=False)
    calls = {"base": 0, "refiner": 0}
    for name, pipe in (("base", base), ("refiner", refiner)):
        def counted(*args, _forward=pipe.unet_forward, _name=name, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)
        pipe.unet_forward = counted

    def run(hires):
        calls.update(base=0, refiner=0)
        result = base.txt2img("a cat", width=32, height=32, steps=3, sampler="euler", seed=2, hires=hires,
                              refiner=Refiner(refiner, switch_at=0.5))
        return result, dict(calls)

    _, plain = run(None)
    # Strength 0.3 starts the second pass below the switch point: all of it is the refiner's.
    low, low_calls = run(HiresFix(scale=2, steps=2, denoising_strength=0.3))
    assert low.images[0].size == (64, 64)
    assert low_calls["base"] == plain["base"] and low_calls["refiner"] > plain["refiner"]
    # Strength 0.9 starts above it: the base model begins the second pass, the refiner ends it.
    _, high_calls = run(HiresFix(scale=2, steps=2, denoising_strength=0.9))
    assert high_calls["base"] > plain["base"] and high_calls["refiner"] > plain["refiner"]
    assert "Refiner: xl-refiner" in low.parameters[0] and "Hires upscale: 2" in low.parameters[0]
