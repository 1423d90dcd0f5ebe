"""Turbo-style checkpoints (SD-Turbo, SDXL-Turbo): recognised from their files, run few-step without guidance."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from latent_diffusion import cli
from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.config import SD1, SD2
from latent_diffusion.diffusion.schedulers import SCHEDULERS, scheduler_sigmas
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.families.distilled import TURBO, sampling_defaults_for
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.pipelines.png_info import read_png_parameters
from pipeline_tiny import TINY_SDXL, TINY_VAE, random_state, write_checkpoint

# SD 2.x in miniature: OpenCLIP layout with the full vocabulary, linear projections, 64-wide heads.
TINY_SD2 = dataclasses.replace(
    SD2,
    unet=dataclasses.replace(SD2.unet, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(1, 2), context_dim=32),
    autoencoder=TINY_VAE,
    conditioner=dataclasses.replace(SD2.conditioner, width=32, layers=2, heads=1),
)
SMALL = ["--prompt", "a red circle", "--width", "32", "--height", "32", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("turbo")
    state = random_state(TINY_SD2)
    save_safetensors(state, folder / "plain.safetensors")
    # Named plainly: only the metadata (as Stability's model-spec fields write it) says Turbo.
    save_safetensors(state, folder / "distilled.safetensors",
                     {"modelspec.title": "SD-Turbo", "modelspec.architecture": "stable-diffusion-v2-512"})
    return folder


@pytest.fixture()
def unet_rows(monkeypatch):
    """The batch rows of every UNet call: guided steps see twice the rows."""
    rows = []
    forward = UNetModel.forward

    def counting(self, x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", counting)
    return rows


def _txt2img(checkpoint, outdir, *options):
    assert cli.main(["txt2img", "--checkpoint", str(checkpoint), "--outdir", str(outdir), *SMALL, *options]) == 0
    (png,) = outdir.glob("*.png")
    return read_png_parameters(png)


def test_turbo_metadata_gives_one_unguided_step_on_trailing_timesteps(sd2_files, tmp_path, unet_rows):
    parameters = _txt2img(sd2_files / "distilled.safetensors", tmp_path / "turbo")
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1," in parameters
    assert unet_rows == [1]  # guidance off: one pass of one row per step


def test_the_same_weights_without_turbo_metadata_run_guided_and_long(sd2_files, tmp_path, unet_rows):
    parameters = _txt2img(sd2_files / "plain.safetensors", tmp_path / "plain")
    assert "Steps: 20, Sampler: Euler a, CFG scale: 7.5," in parameters
    assert sum(unet_rows) == 2 * 20  # conditional and unconditional rows every step


@pytest.mark.parametrize("options, expected", [
    (["--steps", "2", "--cfg-scale", "3", "--scheduler", "karras"],
     "Steps: 2, Sampler: Euler a, Schedule type: Karras, CFG scale: 3,"),
    (["--sampler", "DPM++ 2M Karras"], "Steps: 1, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 1,"),
    (["--sampler", "lcm", "--steps", "4"], "Steps: 4, Sampler: LCM, Schedule type: Trailing, CFG scale: 1,"),
], ids=["all-given", "combined-name-keeps-its-scheduler", "other-sampler"])
def test_options_given_by_hand_win_over_the_turbo_defaults(sd2_files, tmp_path, options, expected):
    assert expected in _txt2img(sd2_files / "distilled.safetensors", tmp_path / "out", *options)


def test_turbo_img2img_defaults_to_enough_steps_for_one_to_run(sd2_files, tmp_path, unet_rows):
    image = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    outdir = tmp_path / "img2img"
    assert cli.main(["img2img", "--checkpoint", str(sd2_files / "distilled.safetensors"), "--init-image", str(image),
                     "--outdir", str(outdir), *SMALL]) == 0  # strength 0.75: of 1 step, none would run
    (png,) = outdir.glob("*.png")
    assert "Steps: 2, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1," in read_png_parameters(png)
    assert unet_rows == [1]


def test_sdxl_turbo_is_known_by_its_release_file_name_and_defaults_to_512_px(tmp_path):
    from latent_diffusion.pipelines.commands import native_image_size
    from latent_diffusion.pipelines.common import Pipeline

    turbo = Pipeline.from_checkpoint(write_checkpoint(TINY_SDXL, tmp_path / "sd_xl_turbo_1.0_fp16.safetensors"),
                                     progress=False)
    assert turbo.family.name == "sdxl" and turbo.sampling_defaults is TURBO
    assert native_image_size(turbo) == 512
    base = Pipeline.from_checkpoint(write_checkpoint(TINY_SDXL, tmp_path / "sd_xl_base_1.0.safetensors"),
                                    progress=False)
    assert base.sampling_defaults is None and native_image_size(base) == 1024


def test_recognition_of_names_metadata_and_diffusers_folders(tmp_path):
    assert sampling_defaults_for(None) is None
    assert sampling_defaults_for(tmp_path / "sd_turbo.safetensors") is TURBO  # the name alone is enough
    assert sampling_defaults_for(tmp_path / "SDXL-Turbo") is TURBO
    save_safetensors({"w": torch.zeros(1)}, tmp_path / "other.safetensors", {"modelspec.title": "SDXL 1.0 Base"})
    assert sampling_defaults_for(tmp_path / "other.safetensors") is None
    (tmp_path / "other.ckpt").write_bytes(b"PK\x03\x04 not read")
    assert sampling_defaults_for(tmp_path / "other.ckpt") is None

    def folder(name, **scheduler):
        (tmp_path / name / "scheduler").mkdir(parents=True)
        (tmp_path / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        return tmp_path / name

    assert sampling_defaults_for(folder("a", _class_name="EulerAncestralDiscreteScheduler",
                                        timestep_spacing="trailing")) is TURBO
    assert sampling_defaults_for(folder("b", _class_name="EulerDiscreteScheduler", timestep_spacing="leading")) is None
    (tmp_path / "c" / "scheduler").mkdir(parents=True)
    (tmp_path / "c" / "scheduler" / "scheduler_config.json").write_text("{not json")
    assert sampling_defaults_for(tmp_path / "c") is None


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_trailing_schedule_equals_diffusers_euler_ancestral_trailing(steps):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=SD1.schedule.linear_start, beta_end=SD1.schedule.linear_end,
        num_train_timesteps=1000, timestep_spacing="trailing")
    reference.set_timesteps(steps)
    schedule = NoiseSchedule.from_config(SD2.schedule)
    sigmas = scheduler_sigmas(SCHEDULERS[TURBO.scheduler], schedule, steps)
    assert torch.equal(schedule.timestep_at(sigmas[:-1]).round().long(), reference.timesteps.long())
    torch.testing.assert_close(sigmas.float(), reference.sigmas, rtol=1e-5, atol=0)
