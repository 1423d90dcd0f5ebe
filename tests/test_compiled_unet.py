"""The optional compiled UNet (compiled ahead of time per input shape, kept on disk) against the eager one."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_diffusion.nn import compiled as compiled_module
from latent_diffusion.nn.bf16 import has_native_bf16
from latent_diffusion.nn.compiled import CompiledUNet, weights_digest
from latent_diffusion.pipelines.common import Pipeline
from latent_diffusion.training.metrics import psnr
from pipeline_tiny import TINY_SD1, write_checkpoint

OPTIONS = dict(seed=3, width=32, height=32, steps=3, sampler="dpmpp_2m")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("compiled") / "tiny.safetensors")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COMPILE_CACHE", str(tmp_path / "compiled"))
    return tmp_path / "compiled"


def _no_compiling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], np.int16)


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    return float(psnr(*(torch.from_numpy(pixels).float()[None] / 255 for pixels in (image, reference))))


@pytest.mark.slow  # one compile of the tiny UNet: about a minute on 2 cores
def test_compiled_unet_makes_the_eager_image_and_a_later_process_loads_it(checkpoint, cache, monkeypatch):
    eager = _pixels(Pipeline.from_checkpoint(checkpoint, progress=False).txt2img("a red circle", **OPTIONS))
    compiled_pipe = Pipeline.from_checkpoint(checkpoint, progress=False, compile_unet=True)
    assert np.abs(_pixels(compiled_pipe.txt2img("a red circle", **OPTIONS)) - eager).max() <= 1
    (package,) = cache.glob("*.pt2")  # one shape (batch 2 under guidance), nothing half-written left
    assert list(cache.iterdir()) == [package]  # nor Inductor's work files
    with pytest.raises(RuntimeError, match="inference"):
        compiled_pipe.unet_forward(torch.zeros(2, 4, 8, 8), torch.zeros(2))
    # The model keeps its plain UNet, so its state dict keeps the checkpoint's names.
    assert all(not key.startswith("_orig_mod") for key in compiled_pipe.model.state_dict())
    # A new pipeline (as a new process would) finds the package on disk instead of compiling.
    _no_compiling(monkeypatch)
    again = Pipeline.from_checkpoint(checkpoint, progress=False, compile_unet=True)
    assert np.abs(_pixels(again.txt2img("a red circle", **OPTIONS)) - eager).max() <= 1
    assert list(cache.glob("*.pt2")) == [package]


@pytest.mark.slow
@pytest.mark.skipif(not has_native_bf16("cpu"), reason="this CPU has no native bfloat16")
def test_bf16_mode_compiles_its_bf16_graph(checkpoint, cache, monkeypatch):
    monkeypatch.setattr(compiled_module, "AUTOTUNE_BELOW", 0)  # the plain compile: a third of the time
    exact = _pixels(Pipeline.from_checkpoint(checkpoint, progress=False).txt2img("a red circle", **OPTIONS))
    bf16 = _pixels(Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True).txt2img("a red circle", **OPTIONS))
    both = Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True, compile_unet=True)
    assert next(both.model.unet.parameters()).dtype == torch.bfloat16
    compiled = _pixels(both.txt2img("a red circle", **OPTIONS))
    # Fused differently, the graph rounds differently from eager bf16: as close to the exact image.
    assert _psnr(compiled, exact) >= min(_psnr(bf16, exact) - 3, 30)
    assert _psnr(compiled, bf16) >= 25


def test_packages_are_named_by_the_weights_and_the_input_shapes(tmp_path):
    unet = torch.nn.Linear(4, 4)
    compiled = CompiledUNet(unet, unet, cache_dir=tmp_path)
    x, t = torch.zeros(2, 4), torch.zeros(2)
    key = compiled._key(*torch.utils._pytree.tree_flatten(((x, t, None, None), {})))
    other_batch = compiled._key(*torch.utils._pytree.tree_flatten(((torch.zeros(1, 4), t[:1], None, None), {})))
    assert key != other_batch
    before = weights_digest(unet)
    with torch.no_grad():
        unet.weight[0, 0] += 1
    compiled.weights_changed()
    assert weights_digest(unet) != before
    assert compiled._key(*torch.utils._pytree.tree_flatten(((x, t, None, None), {}))) != key


def test_a_number_for_the_timestep_runs_eagerly_and_a_failed_compile_says_so(tmp_path, monkeypatch):
    unet = torch.nn.Identity()
    unet.register_parameter("weight", torch.nn.Parameter(torch.ones(1)))
    calls = []

    def network(x, timesteps, context=None, y=None):
        calls.append(timesteps)
        return x * unet.weight

    compiled = CompiledUNet(network, unet, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        _no_compiling(monkeypatch)  # a float would be compiled in as a constant: one package per step
        assert torch.equal(compiled(torch.ones(2), 0.5), torch.ones(2)) and calls == [0.5]

        def broken(*args, **kwargs):
            raise OSError("no C++ compiler")

        monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
        with pytest.raises(RuntimeError, match="compiling the UNet failed .*no C\\+\\+ compiler.*without --compile"):
            compiled(torch.ones(2), torch.zeros(2))

        def out_of_memory(*args, **kwargs):  # as Inductor reports it: its error, naming the MemoryError
            raise RuntimeError("InductorError: MemoryError: ") from MemoryError()

        monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", out_of_memory)
        with pytest.raises(RuntimeError, match="without --compile \\(it ran out of memory: .*--bf16 halves them"):
            compiled(torch.ones(2), torch.zeros(2))
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left in the cache


def test_a_package_that_disagrees_with_the_eager_network_is_dropped(tmp_path, monkeypatch):
    unet = torch.nn.Linear(3, 3)
    answers = iter([torch.full((2, 3), float("nan")), None, torch.zeros(2, 3)])  # None: the right output
    compiled_paths = []

    def fake_compile(exported, package_path, inductor_configs):
        compiled_paths.append(inductor_configs)
        work = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # Inductor's work files go beside the packages
        assert work.parent == Path(package_path).parent and work.is_dir()
        open(package_path, "wb").close()

    def fake_load(path):
        wrong = next(answers)
        return lambda *args, **kwargs: unet(args[0]) if wrong is None else wrong

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    x = torch.randn(2, 3)

    def network(x, timesteps, context=None, y=None):
        return unet(x)

    with torch.no_grad():
        compiled = CompiledUNet(network, unet, cache_dir=tmp_path, progress=False, autotune=True)
        assert torch.equal(compiled(x, torch.zeros(2)), unet(x))  # the searched kernels' NaN dropped, plain kept
        assert [options.get("max_autotune", False) for options in compiled_paths] == [True, False]
        assert len(list(tmp_path.glob("*.pt2"))) == 1
        assert len(list(tmp_path.iterdir())) == 1  # and are gone after each compile
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == inductor_dir
        other = CompiledUNet(network, unet, cache_dir=tmp_path / "other", progress=False, autotune=False)
        with pytest.raises(RuntimeError, match="from the eager UNet's.*without --compile"):
            other(x, torch.zeros(2))  # its only compile disagrees: nothing kept
    assert list((tmp_path / "other").glob("*.pt2")) == []


def test_lean_and_compiled_do_not_combine(checkpoint):
    with pytest.raises(ValueError, match="does not combine"):
        Pipeline.from_checkpoint(checkpoint, progress=False, lean=True, compile_unet=True)


def test_weights_sharing_one_loaded_buffer_are_compiled_from_storages_of_their_own(tmp_path, monkeypatch):
    # A file loaded without copying makes every weight a view of one file-sized buffer; the compiler
    # writes each constant's whole storage (SD 1.5 in fp32: 686 x 4 GB, a MemoryError).
    unet = torch.nn.Linear(3, 3)
    buffer = torch.arange(100, dtype=torch.float32)
    with torch.no_grad():
        unet.weight.data = buffer[:9].view(3, 3)
        unet.bias.data = buffer[9:12]
    storages = []

    def fake_compile(exported, package_path, inductor_configs):
        storages.extend(p.untyped_storage().nbytes() for p in (unet.weight, unet.bias))
        raise OSError("stop here")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    compiled = CompiledUNet(lambda x, t, context=None, y=None: unet(x), unet, cache_dir=tmp_path, progress=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="stop here"):
        compiled(torch.randn(2, 3), torch.zeros(2))
    assert storages == [36, 12]
    assert torch.equal(unet.weight, buffer[:9].view(3, 3)) and torch.equal(unet.bias, buffer[9:12])


def test_the_command_line_reports_a_failed_compile_in_one_line(tmp_path, monkeypatch, capsys, cache):
    from latent_diffusion import cli

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    code = cli.main(["txt2img", "a red circle", "--compile", "--steps", "1", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "ldm txt2img: error: compiling the UNet failed (OSError: no C++ compiler); run without --compile" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
