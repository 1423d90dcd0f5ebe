"""Banded ("tiled") VAE decoding and encoding against the untiled network, with random weights.

Random weights are the hard case for any tiling: the decoder depends strongly on its GroupNorm
statistics and the mid-block attention reaches across the whole image. The banded run must still
give the untiled result, to float32 rounding, and to float16 storage rounding for activations
above ``exact_bytes``.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from latent_diffusion.config import AutoencoderConfig
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
from latent_diffusion.models.vae_tiling import decode_tiled, encode_tiled
from pipeline_tiny import TINY_VAE

# Bands of a few rows: every layer runs in many bands, with halos at every border.
SMALL_BANDS = 16 * 1024
# Attention inside a level as well as in the mid-block; GroupNorms away from the identity.
ATTENTION_VAE = dataclasses.replace(TINY_VAE, attn_resolutions=(128,), resolution=256)
TINY_VQ = AutoencoderConfig(kind="vq", embed_dim=3, z_channels=3, double_z=False, ch=32, ch_mult=(1, 2),
                            num_res_blocks=1, resolution=32, n_embed=64)


def psnr(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB against the reference's own peak-to-peak range."""
    peak = (reference.max() - reference.min()).item()
    return 10 * math.log10(peak ** 2 / ((ours - reference) ** 2).mean().item())


def random_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return random_norms(AutoencoderKL(ATTENTION_VAE), seed=0)


def test_banded_decode_is_the_untiled_decode(vae):
    z = torch.randn(2, 4, 18, 13, generator=torch.Generator().manual_seed(1))  # odd sizes, two samples
    with torch.no_grad():
        reference = vae.decode(z)
    banded = decode_tiled(vae, z, band_bytes=SMALL_BANDS)
    assert banded.shape == reference.shape == (2, 3, 72, 52)
    torch.testing.assert_close(banded, reference, rtol=1e-4, atol=1e-5)


def test_banded_encode_is_the_untiled_encode(vae):
    image = torch.rand(1, 3, 68, 44, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        reference = vae.encode(image)
    banded = encode_tiled(vae, image, band_bytes=SMALL_BANDS)
    torch.testing.assert_close(banded.mean, reference.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(banded.logvar, reference.logvar, rtol=1e-4, atol=1e-5)


def test_activations_above_the_exact_size_are_stored_in_float16(vae):
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = vae.decode(z)
    exact = decode_tiled(vae, z, band_bytes=SMALL_BANDS)
    half = decode_tiled(vae, z, band_bytes=SMALL_BANDS, exact_bytes=0)
    assert 45 < psnr(half, reference) < psnr(exact, reference)


def test_a_float16_overflow_is_a_clear_error(vae):
    z = 1e6 * torch.randn(1, 4, 8, 8)
    with pytest.raises(FloatingPointError, match="float16 storage"):
        decode_tiled(vae, z, exact_bytes=0)


def test_vq_decode_quantises_then_decodes_in_bands():
    torch.manual_seed(4)
    vq = random_norms(VQModel(TINY_VQ), seed=4)
    h = torch.randn(1, 3, 20, 12)
    with torch.no_grad():
        reference = vq.decode(h)
    torch.testing.assert_close(decode_tiled(vq, h, band_bytes=SMALL_BANDS), reference, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        encoded = vq.encode(torch.rand(1, 3, 40, 24) * 2 - 1)
    assert encode_tiled(vq, torch.rand(1, 3, 40, 24) * 2 - 1).shape == encoded.shape


def test_lean_weights_are_upcast_per_layer():
    from latent_diffusion.nn.lean import make_lean

    torch.manual_seed(5)
    vae = random_norms(AutoencoderKL(TINY_VAE), seed=5)
    lean = make_lean(AutoencoderKL(TINY_VAE).eval(), min_parameters=0)
    lean.load_state_dict({k: v.half() for k, v in vae.state_dict().items()})
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        reference = lean.decode(z)
    torch.testing.assert_close(decode_tiled(lean, z, band_bytes=SMALL_BANDS), reference, rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_clear_errors(vae):
    with pytest.raises(ValueError, match="band_bytes"):
        decode_tiled(vae, torch.randn(1, 4, 8, 8), band_bytes=0)
    with pytest.raises(ValueError, match="expects latents"):
        decode_tiled(vae, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        encode_tiled(vae, torch.rand(1, 3, 30, 32))
    with pytest.raises(TypeError, match="AutoencoderKL or VQModel"):
        decode_tiled(torch.nn.Identity(), torch.randn(1, 4, 8, 8))


def test_pipeline_decodes_in_bands_when_asked(tmp_path, monkeypatch):
    from latent_diffusion.pipelines import common
    from latent_diffusion.pipelines.common import Pipeline
    from pipeline_tiny import TINY_SD1, write_checkpoint

    calls = []

    def spy(vae, z, **kwargs):
        calls.append(tuple(z.shape))
        return decode_tiled(vae, z, **kwargs)

    monkeypatch.setattr(common, "decode_tiled", spy)
    path = write_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors")
    pipe = Pipeline.from_checkpoint(path, progress=False, tiled_vae=True)
    latents = torch.randn(1, 4, 40, 24)
    banded = pipe.decode(latents)
    assert calls == [(1, 4, 40, 24)]
    pipe.tiled_vae = False
    torch.testing.assert_close(banded, pipe.decode(latents), rtol=1e-4, atol=1e-5)
    assert len(calls) == 1
