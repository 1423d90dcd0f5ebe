"""Bad input through ``ldm`` (and the Python API beneath it): one clear line, never a traceback, a hang
or an unbounded allocation, and nothing the user made is lost.

Commands run in-process through ``cli.main`` on the built-in models (tiny, 64 px); in a subprocess
only where the process boundary matters (a reader that leaves, what a fresh interpreter imports).
"""
from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from pipeline_tiny import write_task_images

from latent_diffusion import cli
from latent_diffusion.pipelines import common
from latent_diffusion.pipelines.png_info import read_png_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(command: str, err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm {command}: error: "), err
    return lines[0]


@pytest.fixture()
def loads(monkeypatch) -> list:
    """The checkpoints the run loaded: a check that must come first leaves it empty."""
    loaded = []
    real = common.Pipeline.from_checkpoint.__func__

    def recording(cls, path=None, **options):
        loaded.append(path)
        return real(cls, path, **options)

    monkeypatch.setattr(common.Pipeline, "from_checkpoint", classmethod(recording))
    return loaded


@pytest.fixture()
def image_files(tmp_path) -> Path:
    return write_task_images(tmp_path)


def png_claiming(path: Path, width: int, height: int, parameters: str | None = None) -> Path:
    """A small file whose PNG header claims ``width`` x ``height`` pixels (a decompression bomb's)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    if parameters is not None:
        parts.append(chunk(b"tEXt", b"parameters\0" + parameters.encode("latin-1")))
    parts += [chunk(b"IDAT", zlib.compress(b"\0" * 64)), chunk(b"IEND", b"")]
    path.write_bytes(b"".join(parts))
    return path


# ---------------------------------------------------------------------------------------------- 1. checkpoints
def test_a_zip_that_is_not_a_torch_checkpoint_is_named(capsys, tmp_path):
    archive = tmp_path / "z.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("hello.txt", "hi")
    code, _, err = run(capsys, "info", archive)
    assert code == 2 and f"{archive}: a zip archive holding hello.txt, not a PyTorch checkpoint" in one_error_line("info", err)
    out = tmp_path / "out"
    code, _, err = run(capsys, "txt2img", "x", "-c", archive, "-o", out)
    assert code == 2 and "not a PyTorch checkpoint" in one_error_line("txt2img", err)
    assert not out.exists()


def test_a_torch_file_without_a_model_is_named_in_the_error(capsys, tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"a": torch.zeros(2)}, path)
    code, _, err = run(capsys, "info", path)
    assert code == 2 and f"{path}: no UNet keys" in one_error_line("info", err)


def test_info_names_family_and_parts_of_the_built_in_and_trained_models(capsys, tmp_path):
    from pipeline_tiny import TINY_CLASS

    from latent_diffusion.models.ldm import LatentDiffusion
    from latent_diffusion.training.ldm_model import export_single_file

    trained = export_single_file(LatentDiffusion(TINY_CLASS), None, (0.0, 0), tmp_path / "trained.safetensors")
    for path, parts in ((common.ASSETS / "shapes-ldm.safetensors", ("unet", "vae", "text_encoder")),
                        (common.ASSETS / "shapes-sr.safetensors", ("unet", "vae")),
                        (trained, ("unet", "vae", "class_embedder"))):
        code, out, err = run(capsys, "info", path)
        assert code == 0, err
        assert "family:      custom - a model trained with this package" in out
        listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
        assert listed == list(parts)


# ---------------------------------------------------------------------------------------------- 3. outputs
def test_an_output_folder_that_is_a_file_is_refused_before_the_model_loads(capsys, tmp_path, loads):
    taken = tmp_path / "taken"
    taken.write_text("the user's notes")
    for outdir in (taken, taken / "inside"):
        code, _, err = run(capsys, "txt2img", "x", "--steps", 1, "-o", outdir)
        assert code == 2 and f"output folder {outdir}: {taken} is a file" in one_error_line("txt2img", err)
    assert loads == [] and taken.read_text() == "the user's notes"


def refuse_writes(monkeypatch, folder: Path, code: int, when=lambda name: True) -> None:
    """Opening a file for writing in ``folder`` fails with ``code`` (as on a read-only or full disk)."""
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        target = Path(os.fsdecode(path))
        if flags & (os.O_WRONLY | os.O_RDWR) and folder in (target, target.parent) and when(target.name):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_an_output_folder_that_takes_no_files_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch,
                                                                                 loads, code):
    outdir = tmp_path / "out"
    outdir.mkdir()
    refuse_writes(monkeypatch, outdir, code)
    status, _, err = run(capsys, "txt2img", "x", "--steps", 1, "-o", outdir)
    assert status == 2
    assert f"output folder {outdir}: cannot write in {outdir} ({os.strerror(code)})" in one_error_line("txt2img", err)
    assert loads == []
    # A folder still to be made is tried where it would be made.
    status, _, err = run(capsys, "txt2img", "x", "--steps", 1, "-o", outdir / "new" / "deeper")
    assert status == 2 and f"cannot write in {outdir} (" in one_error_line("txt2img", err)
    assert not (outdir / "new").exists()


def test_a_write_failure_at_the_end_keeps_the_images_written_before_it(capsys, tmp_path, monkeypatch):
    outdir = tmp_path / "out"
    refuse_writes(monkeypatch, outdir, errno.ENOSPC, when=lambda name: "00001-" in name)
    code, out, err = run(capsys, "txt2img", "x", "--steps", 1, "-W", 32, "-H", 32, "--seed", 5,
                         "--batch-count", 2, "-o", outdir)
    assert code == 2
    line = one_error_line("txt2img", err)
    assert f"could not write {outdir / '00001-6.png'} (No space left on device)" in line
    assert f"the 1 image written before it stay in {outdir}" in line
    assert sorted(p.name for p in outdir.iterdir()) == ["00000-5.png"]  # and no temporary file
    assert out.splitlines() == [str(outdir / "00000-5.png")]
    assert "Seed: 5" in read_png_parameters(outdir / "00000-5.png")


# ---------------------------------------------------------------------------------------------- 4. sizes
@pytest.fixture()
def sampling_started(monkeypatch) -> list:
    """Calls of the sampler and of the VAE encoder: a refused size leaves it empty."""
    from latent_diffusion.models.autoencoder import AutoencoderKL

    started = []
    monkeypatch.setattr(common, "sample", lambda *a, **k: started.append("sample") or pytest.fail("sampling ran"))
    monkeypatch.setattr(AutoencoderKL, "encode", lambda *a, **k: started.append("encode") or pytest.fail("encoded"))
    return started


def test_a_size_that_cannot_fit_in_memory_is_refused_before_sampling(capsys, tmp_path, monkeypatch, sampling_started):
    from latent_diffusion.pipelines import memory

    monkeypatch.setattr(memory, "_host_available", lambda: 16 * memory.GIB)
    code, _, err = run(capsys, "txt2img", "x", "-W", 1000000, "--steps", 1, "-o", tmp_path / "out")
    line = one_error_line("txt2img", err)
    assert code == 2 and sampling_started == [] and not (tmp_path / "out").exists()
    # The built-in decoder's widest full-size activation has 64 channels: 4 copies in float32.
    assert "a 1000000x64 image needs about 61.0 GiB for the VAE decoder (4 x 64 channels at 1000000x64" in line
    assert "but only 16.0 GiB of memory is free; use a size up to about 4096x4096" in line
    code, _, err = run(capsys, "txt2img", "x", "--batch-size", 100000, "--steps", 1, "-o", tmp_path / "out")
    assert code == 2 and "a batch of 100000 64x64 images needs about 390.6 GiB for the VAE decoder" in err
    assert "use --batch-size 4096 or one image at a time, a size up to about 4096x4096" in err
    # Where the UNet would fit and only the decoder would not, tiled decoding is offered.
    monkeypatch.setattr(memory, "_host_available", lambda: 48 * memory.GIB)
    code, _, err = run(capsys, "txt2img", "x", "-W", 8192, "-H", 8192, "--steps", 1, "-o", tmp_path / "out")
    line = one_error_line("txt2img", err)
    assert code == 2 and sampling_started == []
    assert "needs about 64.0 GiB for the VAE decoder" in line
    assert "use --tiled-vae (Pipeline(tiled_vae=True); then about 40.0 GiB) or a size up to about 7088x7088" in line


def test_an_init_image_too_large_for_memory_is_refused_before_encoding(capsys, image_files, monkeypatch,
                                                                      sampling_started):
    from latent_diffusion.pipelines import memory

    Image.new("RGB", (2048, 2048), "red").save(image_files / "large.png")
    monkeypatch.setattr(memory, "_host_available", lambda: 512 * 2**20)
    code, _, err = run(capsys, "img2img", "-p", "x", "-i", image_files / "large.png", "--steps", 1, "-o", image_files / "o")
    line = one_error_line("img2img", err)
    assert code == 2 and sampling_started == []
    assert "a 2048x2048 image needs about 3.0 GiB for the VAE encoder (6 x 32 channels at 2048x2048" in line
    assert "but only 512 MiB of memory is free; use a size up to about 832x832" in line


def test_a_hires_pass_decoded_in_bands_is_checked_as_banded(monkeypatch):
    from latent_diffusion.pipelines import hires as hires_module
    from latent_diffusion.pipelines import memory
    from latent_diffusion.pipelines.hires import HiresFix

    pipe = common.Pipeline.from_checkpoint(progress=False)
    options = dict(width=32, height=32, steps=1, seed=1, hires=HiresFix(scale=2, steps=1, denoising_strength=0.5))
    # At 64x64 the UNet needs 2.5 MiB and the decoder 4 MiB whole, 2 MiB in bands: 3 MiB fits only banded.
    monkeypatch.setattr(memory, "_host_available", lambda: 3 * 2**20)
    with pytest.raises(memory.InsufficientMemoryError, match="64x64 image needs about 4 MiB for the VAE decoder"):
        pipe.txt2img("a red circle", **options)
    monkeypatch.setattr(hires_module, "AUTO_TILED_VAE_BYTES", 1)  # the hires pass decodes in bands
    assert pipe.txt2img("a red circle", **options).images[0].size == (64, 64)


def test_memory_estimates_match_the_documented_tiled_decoder_peak():
    from latent_diffusion.pipelines import memory

    from latent_diffusion.config import SD1

    # models/vae_tiling.py measured the SD decoder at 2048 px: tiled, a 4 GiB peak.
    tiled = memory.decoder_need(SD1.autoencoder, 1, 2048, 2048, 4, tiled=True)
    assert tiled.bytes == 4 * memory.GIB and tiled.channels == 256
    assert memory.decoder_need(SD1.autoencoder, 1, 2048, 2048, 4).bytes == 16 * memory.GIB


def test_the_decoder_estimate_does_not_exceed_a_measured_peak(tmp_path):
    # Peak resident memory of one decode in a fresh interpreter: the estimate never refuses what fits.
    script = """
import resource, sys, torch
from latent_diffusion.checkpoints.load import load_checkpoint
from latent_diffusion.pipelines.common import ASSETS
from latent_diffusion.pipelines.memory import decoder_need
torch.set_num_threads(1)
vae = load_checkpoint(ASSETS / "shapes-ldm.safetensors").model.first_stage_model
z = torch.randn(1, 4, 128, 128)
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
with torch.no_grad():
    vae.decode(z)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - before, decoder_need(vae.config, 1, 512, 512, 4).bytes)
"""
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux /proc")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured, estimate = map(int, result.stdout.split())
    assert estimate <= 1.1 * measured, (estimate, measured)


def test_a_decompression_bomb_is_refused_unread_and_its_parameters_are_still_readable(capsys, tmp_path,
                                                                                     sampling_started):
    bomb = png_claiming(tmp_path / "bomb.png", 30000, 30000, "a prompt\nSteps: 3, Sampler: Euler, Seed: 1")
    code, _, err = run(capsys, "img2img", "-p", "x", "-i", bomb, "-o", tmp_path / "out")
    line = one_error_line("img2img", err)
    assert code == 2 and f"init image file {bomb} is too large to read" in line and "900000000 pixels" in line
    code, out, err = run(capsys, "png-info", bomb)
    assert code == 0 and out == "a prompt\nSteps: 3, Sampler: Euler, Seed: 1\n", err


@pytest.mark.parametrize("command", ["txt2img", "img2img"])
def test_width_zero_is_an_error_not_the_default_size(capsys, image_files, command, loads):
    inputs = ["-i", image_files / "image.png"] if command == "img2img" else []
    code, _, err = run(capsys, command, "-p", "x", *inputs, "-W", 0, "--steps", 1, "-o", image_files / "out")
    assert code == 2 and "--width 0: give a positive multiple of 8, or leave --width out" in one_error_line(command, err)
    assert loads == []


# ---------------------------------------------------------------------------------------------- 5. devices
def test_an_unknown_device_is_named(capsys, tmp_path, loads):
    code, _, err = run(capsys, "txt2img", "x", "--device", "bogus", "-o", tmp_path / "out")
    assert code == 2 and "unknown device 'bogus'; use cpu, cuda, cuda:N or mps" in one_error_line("txt2img", err)
    assert loads == []
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        common.Pipeline.from_checkpoint(device="bogus")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys, tmp_path, loads):
    code, _, err = run(capsys, "txt2img", "x", "--device", "cuda", "-o", tmp_path / "out")
    line = one_error_line("txt2img", err)
    assert code == 2 and f"device 'cuda': this PyTorch {torch.__version__}" in line and "use --device cpu" in line
    assert loads == []


def test_running_out_of_memory_anyway_is_one_line(capsys, tmp_path, monkeypatch):
    def allocation_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 123 bytes.")

    monkeypatch.setattr(common.Pipeline, "txt2img", allocation_fails)
    code, _, err = run(capsys, "txt2img", "x", "-o", tmp_path / "out")
    assert code == 2 and "ran out of memory" in one_error_line("txt2img", err) and "--tiled-vae" in err


# ---------------------------------------------------------------------------------------------- 6. pipes
def run_into_a_closed_pipe(*args: str, cwd: Path, errors_too: bool = False) -> subprocess.CompletedProcess:
    """Run ``ldm`` whose reader has already gone (as ``ldm ... | head -1`` once head has exited);
    ``errors_too``: stderr goes into the same pipe (``2>&1 | head -1``)."""
    process = subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", *map(str, args)], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT if errors_too else subprocess.PIPE)
    process.stdout.close()
    stderr = "" if errors_too else process.stderr.read().decode()
    return subprocess.CompletedProcess(args, process.wait(timeout=300), "", stderr)


def test_every_printing_command_ends_quietly_when_its_reader_leaves(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    runs = {"info": ["info"], "info --json": ["info", "--json"], "samplers": ["samplers"],
            "txt2img": ["txt2img", "a red circle", "--steps", 1, "-W", 32, "-H", 32, "--seed", 2, "--batch-count", 2, "-o", "out"]}
    for name, args in runs.items():
        result = run_into_a_closed_pipe(*args, cwd=tmp_path)
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
    # The generation went on after its file list had nowhere to go.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-2.png", "00001-3.png"]
    result = run_into_a_closed_pipe("png-info", tmp_path / "out" / "00001-3.png", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # An error line with nowhere to go still ends as an error (2), not as a failing traceback (1).
    assert run_into_a_closed_pipe("txt2img", "x", "-W", 30, cwd=tmp_path, errors_too=True).returncode == 2


# ---------------------------------------------------------------------------------------------- 7. papercuts
def test_upscale_with_the_built_in_model_records_the_guidance_it_ran_with(capsys, image_files):
    code, _, err = run(capsys, "upscale", "-i", image_files / "small.png", "--steps", 1, "--seed", 1,
                       "-o", image_files / "up", "-q")
    assert code == 0, err
    assert "CFG scale: 1," in read_png_parameters(image_files / "up" / "00000-1.png")


@pytest.mark.parametrize("command", ["img2img", "inpaint", "upscale"])
def test_image_commands_take_the_prompt_as_txt2img_does(capsys, image_files, command):
    inputs = {"img2img": ["-i", image_files / "image.png"], "upscale": ["-i", image_files / "small.png"],
              "inpaint": ["-i", image_files / "image.png", "-m", image_files / "mask.png"]}[command]
    code, _, err = run(capsys, command, "a red circle", *inputs, "--steps", 1, "--seed", 3, "-o", image_files / command)
    assert code == 0, err
    assert read_png_parameters(image_files / command / "00000-3.png").startswith("a red circle\n")


def test_an_unknown_option_is_reported_with_the_commands_own_usage(capsys, image_files):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["img2img", "-i", str(image_files / "image.png"), "--bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: ldm img2img ")
    assert err.rstrip().endswith("ldm img2img: error: unrecognized arguments: --bogus")


def test_sample_with_the_built_in_text_model_says_what_to_run_instead(capsys, tmp_path):
    code, _, err = run(capsys, "sample", "--steps", 1, "-o", tmp_path / "out")
    line = one_error_line("sample", err)
    assert code == 2 and "the model 'shapes-ldm' draws from a text prompt: run `ldm txt2img \"PROMPT\"`" in line
    assert "custom" not in line


def test_samplers_call_ddim_deterministic(capsys):
    code, out, _ = run(capsys, "samplers")
    samplers = out.split("\n\n")[0].splitlines()
    kinds = {row.split()[0]: row for row in samplers}
    assert code == 0 and " deterministic " in kinds["ddim"] and " stochastic " in kinds["ddpm"]


def test_the_grid_is_named_after_the_first_and_last_image_of_the_run(capsys, tmp_path):
    outdir = tmp_path / "out"
    for seed in (7, 9):
        code, _, err = run(capsys, "txt2img", "x", "--steps", 1, "-W", 32, "-H", 32, "--seed", seed,
                           "--batch-size", 2, "--grid", "-o", outdir)
        assert code == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == [
        "00000-7.png", "00001-8.png", "00002-9.png", "00003-10.png", "grid-00000-00001.png", "grid-00002-00003.png"]


@pytest.mark.parametrize("argv", [["samplers"], ["png-info", "{png}"], ["txt2img", "--help"]])
def test_commands_that_need_no_model_start_without_pytorch(tmp_path, argv):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 1, Sampler: Euler, Seed: 1")
    png = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    argv = [a.format(png=png) for a in argv]
    script = ("import sys\nfrom latent_diffusion.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert "torch imported: False" in result.stderr, result.stderr


def test_building_a_model_to_read_its_shapes_leaves_torch_dynamo_unimported():
    # torch._dynamo takes 1.5 s to import; initialising meta tensors with normal_ pulls it in.
    script = ("import sys\nfrom latent_diffusion.checkpoints.load import build_on_meta\n"
              "from latent_diffusion.config import SD1, SDXL\nbuild_on_meta(SD1), build_on_meta(SDXL)\n"
              "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_the_builtin_upscaler_refuses_what_it_would_recolour(capsys, tmp_path, loads):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "big.png")
    code, _, err = run(capsys, "upscale", "-i", tmp_path / "big.png", "-o", tmp_path / "out")
    line = one_error_line("upscale", err)
    assert code == 2 and "built-in upscaler" in line and "is 64x64" in line and "--checkpoint" in line
    assert loads == [] and not (tmp_path / "out").exists()
