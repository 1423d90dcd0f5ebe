"""The optional compiled UNet (torch.compile with frozen weights) against the eager one."""
from __future__ import annotations

import numpy as np
import pytest

from latent_diffusion.pipelines.common import Pipeline
from pipeline_tiny import TINY_SD1, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("compiled") / "tiny.safetensors")


@pytest.mark.slow  # compiling even the tiny UNet takes about a minute on 2 cores
def test_compiled_unet_makes_the_eager_image(checkpoint):
    options = dict(seed=3, width=32, height=32, steps=3, sampler="dpmpp_2m")
    eager = Pipeline.from_checkpoint(checkpoint, progress=False).txt2img("a red circle", **options)
    compiled_pipe = Pipeline.from_checkpoint(checkpoint, progress=False, compile_unet=True)
    assert compiled_pipe.unet_forward is not compiled_pipe.model.unet
    compiled = compiled_pipe.txt2img("a red circle", **options)
    difference = np.abs(np.asarray(compiled.images[0], np.int16) - np.asarray(eager.images[0], np.int16))
    assert difference.max() <= 1
    with pytest.raises(RuntimeError, match="inference"):
        compiled_pipe.unet_forward(None, None)
    # The model keeps its plain UNet, so its state dict keeps the checkpoint's names.
    assert all(not key.startswith("_orig_mod") for key in compiled_pipe.model.state_dict())


def test_lean_and_compiled_do_not_combine(checkpoint):
    with pytest.raises(ValueError, match="do not combine"):
        Pipeline.from_checkpoint(checkpoint, progress=False, lean=True, compile_unet=True)
