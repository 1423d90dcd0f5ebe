"""bf16 mode: the UNet in bfloat16 under autocast, everything around it in fp32."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latent_diffusion.nn import bf16 as bf16_module
from latent_diffusion.nn.attention import attention
from latent_diffusion.pipelines.common import Pipeline
from pipeline_tiny import TINY_SD1, write_checkpoint

native = pytest.mark.skipif(not bf16_module.has_native_bf16("cpu"), reason="this CPU has no native bfloat16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("bf16") / "tiny.safetensors")


@native
def test_bf16_mode_makes_nearly_the_fp32_image(checkpoint):
    options = dict(seed=5, width=32, height=32, steps=4, sampler="dpmpp_2m")
    exact = Pipeline.from_checkpoint(checkpoint, progress=False).txt2img("a red circle", **options)
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True)
    assert next(pipe.model.unet.parameters()).dtype == torch.bfloat16
    assert pipe.dtype == torch.float32  # latents and images stay fp32
    assert pipe.tiled_vae  # the small mode decodes in bands
    fast = pipe.txt2img("a red circle", **options)
    a, b = (np.asarray(result.images[0], np.float64) / 255 for result in (exact, fast))
    assert not np.array_equal(a, b)  # bf16 really ran
    assert 10 * math.log10(1 / np.mean((a - b) ** 2)) >= 30


def test_bf16_mode_on_a_device_without_native_bf16_says_so_and_runs_fp32(checkpoint, monkeypatch):
    options = dict(seed=5, width=32, height=32, steps=2, sampler="euler")
    exact = Pipeline.from_checkpoint(checkpoint, progress=False).txt2img("a red circle", **options)
    monkeypatch.setattr(bf16_module, "has_native_bf16", lambda device: False)
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True)
    assert not pipe.bf16 and next(pipe.model.unet.parameters()).dtype == torch.float32 and not pipe.tiled_vae
    result = pipe.txt2img("a red circle", **options)
    assert any("native bfloat16" in warning and "fp32 path instead" in warning for warning in result.warnings)
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(exact.images[0]))
    with pytest.raises(ValueError, match="native bfloat16"):  # the mode itself still refuses such a device
        bf16_module.BF16Autocast(torch.nn.Linear(2, 2))


def test_bf16_mode_does_not_combine_with_lean_or_half(checkpoint):
    with pytest.raises(ValueError, match="lean mode does not combine with bf16 mode"):
        Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True, lean=True)
    with pytest.raises(ValueError, match="without --half"):
        Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True, half=True)


def test_attention_runs_in_bf16_under_cpu_autocast():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=generator) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)  # fp32 inputs are taken down to bf16 as well
    assert out.dtype == torch.bfloat16
    exact = attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out.float(), exact, rtol=0.02, atol=0.02)  # bf16 rounding of the result only
    assert not torch.equal(out.float(), exact)


@native
def test_bf16_mode_sums_the_residual_streams_in_fp32(checkpoint):
    from latent_diffusion.nn.attention import BasicTransformerBlock
    from latent_diffusion.nn.layers import ResBlock

    exact = Pipeline.from_checkpoint(checkpoint, progress=False).model.unet
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, exact.config.context_dim, generator=generator)
    t = torch.tensor([300.0, 700.0])
    blocks = [m for m in pipe.model.unet.modules() if isinstance(m, ResBlock | BasicTransformerBlock)]
    seen: list[torch.dtype] = []
    hooks = [block.register_forward_hook(lambda m, args, out: seen.append(out.dtype)) for block in blocks]
    with torch.no_grad():
        reference = exact(x, t, context)
        fp32_streams = pipe.unet_forward(x, t, context)
        for hook in hooks:
            hook.remove()
        assert blocks and seen == [torch.float32] * len(seen) and len(seen) >= len(blocks)
        for hook in pipe.unet_forward.fp32_hooks:  # the streams in bf16, as autocast alone keeps them
            hook.remove()
        bf16_streams = pipe.unet_forward(x, t, context)

    def error(out: torch.Tensor) -> float:
        return ((out - reference).norm() / reference.norm()).item()

    assert 0 < error(fp32_streams) < error(bf16_streams)


@native
def test_large_unets_keep_bf16_streams(checkpoint, monkeypatch):
    monkeypatch.setattr(bf16_module, "FP32_STREAMS_BELOW", 1000)  # the tiny UNet counts as large
    pipe = Pipeline.from_checkpoint(checkpoint, progress=False, bf16=True)
    assert pipe.unet_forward.fp32_hooks == []
    assert all(parameter.dtype == torch.bfloat16 for parameter in pipe.model.unet.parameters())
