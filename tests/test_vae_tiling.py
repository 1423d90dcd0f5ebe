"""Tiled VAE decoding/encoding against the untiled network (tiny KL autoencoder, random weights).

Random weights make a decoder far more sensitive to its GroupNorm statistics than a trained one
(there is no trained autoencoder in the assets yet), so decode is checked for what tiling must
guarantee whatever the weights: small inputs untouched, no seams, and the untiled result wherever
the GroupNorm statistics are exact.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.models.vae_tiling import _blend_weight, _overlaps, decode_tiled, encode_tiled, tile_starts
from pipeline_tiny import TINY_VAE


def psnr(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB for signals in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4 / ((ours - reference) ** 2).mean().item())


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(TINY_VAE).eval()


def smooth(shape, seed=0, coarse=4):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape[0], shape[1], coarse, coarse, generator=generator)
    return F.interpolate(base, size=shape[2:], mode="bicubic", align_corners=False)


def test_tile_starts_cover_the_length_with_the_overlap():
    assert tile_starts(40, 64, 16) == [0]
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))


def test_blend_weights_of_neighbours_sum_to_one():
    starts = tile_starts(56, 24, 8)
    total = torch.zeros(56)
    for start, (before, after) in zip(starts, _overlaps(starts, 24)):
        total[start:start + 24] += _blend_weight(24, before, after, "cpu")
    torch.testing.assert_close(total, torch.ones(56))


def test_inputs_within_one_tile_are_processed_whole(vae):
    z = torch.randn(1, 4, 16, 16)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode_tiled(vae, z, tile=16, overlap=8), vae.decode(z))
        assert torch.equal(encode_tiled(vae, x, tile=64, overlap=32).mean, vae.encode(x).mean)


def test_tiled_decode_matches_untiled_when_statistics_are_exact():
    """An image whose area fits one tile gets exact GroupNorm statistics: what remains is the tiling
    itself (without the mid-block attention, which sees only its own tile: the one approximation left)."""
    torch.manual_seed(2)
    vae = AutoencoderKL(dataclasses.replace(TINY_VAE, attn_type="none")).eval()
    z = smooth((1, 4, 16, 64), seed=2)
    with torch.no_grad():
        reference = vae.decode(z)
        tiled = decode_tiled(vae, z, tile=32, overlap=16)  # three tiles side by side
    assert tiled.shape == reference.shape
    assert psnr(tiled, reference) >= 35


def test_tiled_encode_matches_untiled_when_statistics_are_exact(vae):
    image = smooth((1, 3, 64, 256), seed=1).clamp(-1, 1)
    with torch.no_grad():
        reference = vae.encode(image).mean
        tiled = encode_tiled(vae, image, tile=128, overlap=64).mean
    assert tiled.shape == reference.shape
    assert psnr(tiled, reference) >= 35


def test_tiled_decode_has_no_seams():
    """Across a seam the tiled image changes no more than the untiled one does there (statistics
    estimated: the image is larger than a tile). Without mid-block attention: with random weights
    it attends far beyond a tile, which no tiling reproduces."""
    torch.manual_seed(3)
    vae = AutoencoderKL(dataclasses.replace(TINY_VAE, attn_type="none")).eval()
    z = smooth((1, 4, 16, 96), seed=3, coarse=2)
    tile, overlap = 32, 16
    with torch.no_grad():
        reference = vae.decode(z)
        image = decode_tiled(vae, z, tile=tile, overlap=overlap)

    def seam_steps(x):
        steps = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))
        starts = tile_starts(96, tile, overlap)
        # The ramps sit at the centres of the overlaps (4 pixels per latent).
        seams = [4 * (a + b + tile) // 2 for a, b in zip(starts, starts[1:])]
        return torch.stack([steps[s - 2:s + 2].max() for s in seams])

    assert (seam_steps(image) <= 1.5 * seam_steps(reference)).all()


@pytest.mark.parametrize("tile, overlap", [(0, 0), (16, 16), (16, -1)])
def test_bad_tiling_is_a_clear_error(vae, tile, overlap):
    with pytest.raises(ValueError, match="tile"):
        decode_tiled(vae, torch.randn(1, 4, 32, 32), tile=tile, overlap=overlap)


def test_encode_tiles_must_fit_the_downsampling(vae):
    with pytest.raises(ValueError, match="multiple of 4"):
        encode_tiled(vae, torch.rand(1, 3, 128, 128), tile=30, overlap=8)


def test_pipeline_decodes_in_tiles_when_asked(tmp_path):
    from latent_diffusion.pipelines.common import Pipeline
    from pipeline_tiny import TINY_SD1, write_checkpoint

    path = write_checkpoint(TINY_SD1, tmp_path / "tiny.safetensors")
    pipe = Pipeline.from_checkpoint(path, progress=False, tiled_vae=True)
    latents = smooth((1, 4, 80, 80), seed=4)
    with torch.no_grad():
        expected = decode_tiled(pipe.model.first_stage_model, latents / pipe.spec.scale_factor)
    torch.testing.assert_close(pipe.decode(latents), expected, rtol=0, atol=0)
    pipe.tiled_vae = False
    assert not torch.equal(pipe.decode(latents), expected)
