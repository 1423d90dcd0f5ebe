"""Lean mode: half-precision weights at rest, float32 compute, block by block (tiny SD 1 model)."""
from __future__ import annotations

import copy

import pytest
import torch

from latent_diffusion.checkpoints.load import load_state_dict_into_model
from latent_diffusion.nn.lean import _parameter_count, make_lean
from pipeline_tiny import TINY_SD1, random_state


@pytest.fixture(scope="module")
def models():
    exact = load_state_dict_into_model(dict(random_state(TINY_SD1)), spec=TINY_SD1).model.eval()
    lean = copy.deepcopy(exact)
    # Tiny blocks: store everything but the timestep MLP, whose dtype the UNet gives its inputs.
    keep = _parameter_count(lean.unet.time_embed) + 1
    # The text encoder calls its body's parts by method, not as modules: it is not made lean.
    for part in (lean.unet, lean.first_stage_model):
        make_lean(part, unit_parameters=200_000, min_parameters=keep)
    # The same network with its weights rounded to fp16 exactly as lean mode stores them.
    rounded = copy.deepcopy(exact)
    rounded.load_state_dict({k: v.float() for k, v in lean.state_dict().items()})
    return exact, lean, rounded


def _bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_weights_are_stored_in_half_precision(models):
    exact, lean, _ = models
    assert _bytes(lean.unet) < 0.7 * _bytes(exact.unet)
    assert _bytes(lean.first_stage_model) < 0.7 * _bytes(exact.first_stage_model)


def test_lean_computes_in_float32_with_the_stored_weights(models):
    exact, lean, rounded = models
    from conftest import assert_close_to_reference

    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        out = lean.unet(x, t, context)
        assert out.dtype == torch.float32
        assert_close_to_reference(out, rounded.unet(x, t, context))
        assert_close_to_reference(lean.first_stage_model.decode(x[:1]), rounded.first_stage_model.decode(x[:1]))
        # And the fp16 rounding of the weights is all that separates it from the exact model.
        error = (out - exact.unet(x, t, context)).abs().max() / out.abs().max()
        assert 0 < error < 1e-2
    assert all(p.dtype == torch.float16 for p in lean.unet.output_blocks.parameters())  # restored after the call


def test_lean_rejects_non_float_dtypes(models):
    with pytest.raises(ValueError, match="floating"):
        make_lean(torch.nn.Linear(2, 2), storage_dtype=torch.int8)


def test_lean_pipeline_images_are_within_30_db_of_exact(tmp_path):
    """The issue's criterion for lean mode: PSNR >= 30 dB against the exact (fp32) pipeline."""
    import numpy as np

    from latent_diffusion.pipelines.common import Pipeline
    from pipeline_tiny import write_checkpoint

    path = write_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors")
    exact = Pipeline.from_checkpoint(path, progress=False)
    lean = Pipeline.from_checkpoint(path, progress=False, lean=True)
    assert lean.dtype == torch.float32  # latents and sampler arithmetic stay fp32
    options = dict(width=32, height=32, steps=4, sampler="euler", guidance_scale=5.0, seed=3)
    a = np.asarray(exact.txt2img("a red circle", **options).images[0], dtype=np.float64) / 255
    b = np.asarray(lean.txt2img("a red circle", **options).images[0], dtype=np.float64) / 255
    assert 10 * np.log10(1 / max(((a - b) ** 2).mean(), 1e-12)) >= 30
