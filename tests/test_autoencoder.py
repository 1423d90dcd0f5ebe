"""First-stage autoencoders against diffusers as the numerical oracle (same random weights both sides)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import assert_close_to_reference

from latent_diffusion.config import LDM_CIN256, SD_VAE, AutoencoderConfig
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
from latent_diffusion.models.distributions import DiagonalGaussianDistribution
from latent_diffusion.models import quantize
from latent_diffusion.models.quantize import VectorQuantizer

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as RefGaussian  # noqa: E402
from diffusers.models.autoencoders.vae import VectorQuantizer as RefQuantizer  # noqa: E402

TINY_KL = AutoencoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
TINY_VQ = AutoencoderConfig(
    kind="vq", embed_dim=3, z_channels=3, double_z=False, ch=32, ch_mult=(1, 2), num_res_blocks=1,
    resolution=32, n_embed=64,
)
DDCONFIG_FIELDS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
    "attn_resolutions", "dropout", "attn_type",
)


def perturb_norms(model: torch.nn.Module) -> torch.nn.Module:
    """GroupNorms start as identity affines; make them not, so a swapped weight/bias would show."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def ldm_yaml(config: AutoencoderConfig) -> dict:
    """The original-YAML dict that diffusers' single-file helpers read."""
    ddconfig = {name: getattr(config, name) for name in DDCONFIG_FIELDS}
    first_stage = {"params": {"embed_dim": config.embed_dim, "ddconfig": ddconfig}}
    return {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": first_stage}}}


def diffusers_kl(ours: AutoencoderKL) -> torch.nn.Module:
    """diffusers.AutoencoderKL holding our weights, converted by diffusers' own single-file code."""
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(ldm_yaml(ours.config), checkpoint)
    config["norm_num_groups"] = ours.config.norm_groups  # the CompVis YAML has no such field
    reference = diffusers.AutoencoderKL(**config)
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


def _rename_vq_key(key: str, levels: int) -> str:
    """CompVis encoder/decoder key -> diffusers Encoder/Decoder key (decoder levels run in reverse)."""
    key = re.sub(r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions.", key)
    key = re.sub(r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(
        r"decoder\.up\.(\d+)\.(block|attn|upsample)\.",
        lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}."
        + {"block": "resnets.", "attn": "attentions.", "upsample": "upsamplers.0."}[m[2]],
        key,
    )
    key = re.sub(r"mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", key)
    key = key.replace("mid.attn_1.", "mid_block.attentions.0.").replace("nin_shortcut", "conv_shortcut")
    key = key.replace(".norm_out.", ".conv_norm_out.")
    if "attentions" in key:
        key = re.sub(r"\.norm\.", ".group_norm.", key)
        key = re.sub(r"\.(q|k|v)\.", lambda m: f".to_{m[1]}.", key)
        key = key.replace(".proj_out.", ".to_out.0.")
    return key


def diffusers_vq(ours: VQModel) -> torch.nn.Module:
    """diffusers.VQModel holding our weights (attention levels become Attn*Block2D)."""
    c = ours.config
    levels = len(c.ch_mult)
    attention = [c.resolution // 2**i in c.attn_resolutions for i in range(levels)]
    reference = diffusers.VQModel(
        in_channels=c.in_channels,
        out_channels=c.out_ch,
        down_block_types=[("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D") for a in attention],
        up_block_types=[("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D") for a in reversed(attention)],
        block_out_channels=[c.ch * m for m in c.ch_mult],
        layers_per_block=c.num_res_blocks,
        latent_channels=c.z_channels,
        vq_embed_dim=c.embed_dim,
        num_vq_embeddings=c.n_embed,
        mid_block_add_attention=c.attn_type != "none",
    )
    converted = {}
    for key, value in ours.state_dict().items():
        new_key = _rename_vq_key(key, levels)
        converted[new_key] = value[:, :, 0, 0] if "attentions" in new_key and value.ndim == 4 else value
    reference.load_state_dict(converted, strict=True)
    return reference.eval()


def tiny_vq(config: AutoencoderConfig = TINY_VQ) -> VQModel:
    model = perturb_norms(VQModel(config))
    with torch.no_grad():
        # Spread the codebook over the latent's range so that different pixels pick different codes.
        model.quantize.embedding.weight.normal_(0.0, 0.5)
    return model


# --------------------------------------------------------------------------------------------
# KL autoencoder


@pytest.mark.parametrize(
    "config",
    [TINY_KL, dataclasses.replace(TINY_KL, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=8, embed_dim=8),
     dataclasses.replace(TINY_KL, ch=16, ch_mult=(1, 2, 2), norm_groups=8)],
    ids=["f2", "f4-wide-latent", "8-groups"],
)
@torch.no_grad()
def test_kl_matches_diffusers(config):
    ours = perturb_norms(AutoencoderKL(config))
    reference = diffusers_kl(ours)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    posterior = ours.encode(x)
    reference_posterior = reference.encode(x).latent_dist
    assert_close_to_reference(posterior.mean, reference_posterior.mean)
    assert_close_to_reference(posterior.logvar, reference_posterior.logvar)
    assert_close_to_reference(posterior.std, reference_posterior.std)

    z = torch.randn_like(posterior.mean)
    assert_close_to_reference(ours.decode(z), reference.decode(z).sample)
    reconstruction, _ = ours(x, sample_posterior=False)
    assert_close_to_reference(reconstruction, reference(x, sample_posterior=False).sample)


def test_posterior_matches_diffusers_distribution():
    # Log-variances outside [-30, 20] exercise the clamp.
    spread = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 40.0, 1.0, 50.0]).view(1, 8, 1, 1)
    moments = torch.randn(2, 8, 4, 4) * spread
    ours, reference = DiagonalGaussianDistribution(moments), RefGaussian(moments)
    other_moments = torch.randn(2, 8, 4, 4)
    assert_close_to_reference(ours.var, reference.var)
    assert_close_to_reference(ours.kl(), reference.kl())
    assert_close_to_reference(
        ours.kl(DiagonalGaussianDistribution(other_moments)), reference.kl(RefGaussian(other_moments))
    )
    sample = torch.randn(2, 4, 4, 4)
    assert_close_to_reference(ours.nll(sample), reference.nll(sample))
    assert torch.equal(ours.mode(), reference.mode())
    drawn = ours.sample(torch.Generator().manual_seed(7))
    assert_close_to_reference(drawn, reference.sample(torch.Generator().manual_seed(7)))
    assert not torch.equal(drawn, ours.sample(torch.Generator().manual_seed(8)))


def test_posterior_rejects_odd_channel_count():
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def test_kl_backward_reaches_every_parameter():
    model = AutoencoderKL(TINY_KL).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, posterior = model(x, generator=torch.Generator().manual_seed(0))
    loss = (reconstruction - x).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_kl_gradients_match_diffusers():
    """Training reuses these modules: in-place activations must not change any gradient."""
    ours = perturb_norms(AutoencoderKL(TINY_KL))
    reference = diffusers_kl(ours)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ours.decode(ours.encode(x).mean).square().mean().backward()
    reference.decode(reference.encode(x).latent_dist.mean).sample.square().mean().backward()
    ours_params = dict(ours.named_parameters())
    pairs = {
        "encoder.conv_in.weight": "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight": "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.mid.attn_1.q.weight": "encoder.mid_block.attentions.0.to_q.weight",
        "decoder.up.0.block.0.nin_shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.mid.attn_1.proj_out.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.conv_out.weight": "decoder.conv_out.weight",
    }
    reference_params = dict(reference.named_parameters())
    for ours_name, reference_name in pairs.items():
        reference_grad = reference_params[reference_name].grad
        assert_close_to_reference(ours_params[ours_name].grad.reshape(reference_grad.shape), reference_grad)


@torch.no_grad()
def test_meta_construction_then_strict_assign_load():
    source = perturb_norms(AutoencoderKL(TINY_KL))
    with torch.device("meta"):
        target = AutoencoderKL(TINY_KL)
    assert all(t.is_meta for t in target.state_dict().values())
    # Everything the forward pass reads must come from the checkpoint: no buffers outside the state dict.
    assert {n for n, _ in target.named_buffers()} <= set(target.state_dict())
    target.load_state_dict(source.state_dict(), assign=True, strict=True)
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(target.eval().decode(z), source.decode(z))


# --------------------------------------------------------------------------------------------
# VQ autoencoder


@pytest.mark.parametrize(
    "config",
    [
        TINY_VQ,
        dataclasses.replace(TINY_VQ, attn_type="none"),  # as the LDM inpainting first stage
        dataclasses.replace(TINY_VQ, ch_mult=(1, 1, 2), attn_resolutions=(16,), embed_dim=4),
    ],
    ids=["vanilla", "no-attention", "attention-level"],
)
@torch.no_grad()
def test_vq_matches_diffusers(config):
    ours = tiny_vq(config)
    reference = diffusers_vq(ours)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    h = ours.encode(x)
    assert_close_to_reference(h, reference.encode(x).latents)
    assert_close_to_reference(ours.decode(h), reference.decode(h).sample)
    assert_close_to_reference(
        ours.decode(h, force_not_quantize=True), reference.decode(h, force_not_quantize=True).sample
    )
    reconstruction, loss = ours(x)
    reference_reconstruction, reference_loss = reference(x, return_dict=False)
    assert_close_to_reference(reconstruction, reference_reconstruction)
    assert_close_to_reference(loss, reference_loss)


def test_vq_decode_code_matches_quantised_decode():
    model = tiny_vq(dataclasses.replace(TINY_VQ, sane_index_shape=True))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reconstruction, _, indices = model(x, return_pred_indices=True)
        assert indices.shape == (1, 8, 8)
        assert_close_to_reference(model.decode_code(indices), reconstruction)


def test_vq_backward_reaches_every_parameter():
    model = VQModel(TINY_VQ).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, codebook_loss = model(x)
    ((reconstruction - x).abs().mean() + codebook_loss).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# Vector quantiser


def _quantizer_pair(**kwargs) -> tuple[VectorQuantizer, RefQuantizer]:
    ours = VectorQuantizer(32, 4, beta=0.25, **kwargs)
    with torch.no_grad():
        ours.embedding.weight.normal_()
    reference = RefQuantizer(32, 4, beta=0.25, **kwargs)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_nearest_code_and_loss_match_reference(legacy):
    ours, reference = _quantizer_pair(legacy=legacy)
    z = torch.randn(2, 4, 5, 6)
    z_q, loss, (perplexity, min_encodings, indices) = ours(z)
    ref_z_q, ref_loss, (_, _, ref_indices) = reference(z)

    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute_force = torch.cdist(flat, ours.embedding.weight).argmin(1)
    assert torch.equal(indices.view(-1), brute_force)
    assert torch.equal(indices, ref_indices)
    expected = ours.embedding.weight[brute_force].view(2, 5, 6, 4).permute(0, 3, 1, 2)
    assert_close_to_reference(z_q, expected)
    assert_close_to_reference(z_q, ref_z_q)
    assert_close_to_reference(loss, ref_loss)
    assert perplexity is None and min_encodings is None


def test_quantizer_blocked_search_matches_brute_force(monkeypatch):
    monkeypatch.setattr(quantize, "DISTANCE_BLOCK_ELEMENTS", 100)  # 3 rows per block, ragged tail
    ours, _ = _quantizer_pair()
    z = torch.randn(50, 4)
    assert torch.equal(ours.nearest_codes(z), torch.cdist(z, ours.embedding.weight).argmin(1))


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_straight_through_gradients(legacy):
    ours, reference = _quantizer_pair(legacy=legacy)
    z = torch.randn(2, 4, 3, 3)
    upstream = torch.randn_like(z)
    grads = []
    for quantizer in (ours, reference):
        z_leaf = z.clone().requires_grad_()
        z_q, loss, _ = quantizer(z_leaf)
        ((z_q * upstream).sum() + loss).backward()
        grads.append((z_leaf.grad, quantizer.embedding.weight.grad))
    # Straight-through: d z_q / d z is the identity, so z's gradient is upstream + d loss / d z.
    (z_grad, codebook_grad), (ref_z_grad, ref_codebook_grad) = grads
    assert_close_to_reference(z_grad, ref_z_grad)
    assert_close_to_reference(codebook_grad, ref_codebook_grad)
    z_leaf = z.clone().requires_grad_()
    ours(z_leaf).z_q.backward(upstream)
    assert torch.equal(z_leaf.grad, upstream)


@pytest.fixture
def used_codes_file(tmp_path):
    path = tmp_path / "used.npy"
    np.save(path, np.array([3, 5, 8, 13, 21, 30], dtype=np.int64))
    return str(path)


@pytest.mark.parametrize("unknown_index", ["random", "extra", 2])
def test_quantizer_remap_matches_reference_and_round_trips(used_codes_file, unknown_index):
    ours, reference = _quantizer_pair(remap=used_codes_file, unknown_index=unknown_index)
    used = torch.tensor([3, 5, 8, 13, 21, 30])
    # Half the pixels sit exactly on used codes (round trip must hold), the rest anywhere.
    picks = used[torch.randint(0, len(used), (2 * 4 * 4,))]
    z = ours.embedding.weight[picks].detach().view(2, 4, 4, 4).permute(0, 3, 1, 2).clone()
    z[:, :, :, 2:] = torch.randn(2, 4, 4, 2)

    torch.manual_seed(1)
    z_q, _, (_, _, indices) = ours(z)
    torch.manual_seed(1)
    _, _, (_, _, ref_indices) = reference(z)
    assert torch.equal(indices, ref_indices)

    shape = (2, 4, 4, 4)
    entries = ours.get_codebook_entry(indices.clone(), shape)
    assert torch.equal(entries, reference.get_codebook_entry(indices.clone(), shape))
    known = torch.isin(ours.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, 4)), used).view(2, 1, 4, 4)
    assert known[:, :, :, :2].all()
    # z_q = z + (code - z) equals the code only up to rounding.
    assert_close_to_reference(torch.where(known, entries, 0), torch.where(known, z_q.detach(), 0))
    if unknown_index == "extra":
        assert int(indices.max()) <= len(used) and (indices[~known.view(-1, 1)] == len(used)).all()


def test_quantizer_rejects_bad_remap_and_shape(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VectorQuantizer(8, 4, remap=str(tmp_path / "missing.npy"))
    path = tmp_path / "used.npy"
    np.save(path, np.array([1, 2]))
    with pytest.raises(ValueError, match="unknown_index"):
        VectorQuantizer(8, 4, remap=str(path), unknown_index="nearest")
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        VectorQuantizer(8, 4)(torch.zeros(1, 3, 2, 2))


# --------------------------------------------------------------------------------------------
# Shapes and input checks


@pytest.mark.parametrize(
    "ch_mult, factor", [((1, 2, 4), 4), ((1, 1, 2, 2, 2), 16)], ids=["f4", "f16"]
)
@pytest.mark.parametrize("kind", ["kl", "vq"])
@torch.no_grad()
def test_latent_shape_follows_downsampling_factor(kind, ch_mult, factor):
    config = dataclasses.replace(
        TINY_KL if kind == "kl" else TINY_VQ, ch_mult=ch_mult, embed_dim=3, z_channels=5
    )
    model = (AutoencoderKL if kind == "kl" else VQModel)(config)
    assert model.downsampling_factor == factor
    x = torch.rand(1, 3, 32, 64)
    latent = model.encode(x)
    latent = latent.sample() if kind == "kl" else latent
    assert latent.shape == (1, 3, 32 // factor, 64 // factor)
    assert model.decode(latent).shape == x.shape


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_bad_inputs_raise_value_errors(kind):
    config = dataclasses.replace(TINY_KL if kind == "kl" else TINY_VQ, ch_mult=(1, 2, 4))
    model = (AutoencoderKL if kind == "kl" else VQModel)(config)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\).*\(1, 2, 16, 16\)"):
        model.encode(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4; got 30x32"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expects images"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="expects latents"):
        model.decode(torch.zeros(1, config.embed_dim + 1, 4, 4))


def test_bad_configs_raise_value_errors():
    with pytest.raises(ValueError, match="kind='vq'"):
        VQModel(TINY_KL)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(dataclasses.replace(TINY_KL, double_z=False))
    with pytest.raises(ValueError, match="multiples of norm_groups=32"):
        AutoencoderKL(dataclasses.replace(TINY_KL, ch=16))
    with pytest.raises(ValueError, match="attn_type"):
        AutoencoderKL(dataclasses.replace(TINY_KL, attn_type="linear"))


# --------------------------------------------------------------------------------------------
# Full size


@pytest.mark.slow
@torch.no_grad()
def test_sd_vae_full_size_matches_diffusers():
    ours = perturb_norms(AutoencoderKL(SD_VAE))
    assert len(ours.state_dict()) == 248
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert sum(p.numel() for p in ours.encoder.parameters()) == 34_163_592
    assert sum(p.numel() for p in ours.decoder.parameters()) == 49_490_179
    reference = diffusers_kl(ours)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert_close_to_reference(ours.encode(x).mean, reference.encode(x).latent_dist.mean)
    z = torch.randn(1, 4, 8, 8)
    assert_close_to_reference(ours.decode(z), reference.decode(z).sample)


@pytest.mark.slow
@torch.no_grad()
def test_ldm_cin256_vq_full_size_matches_diffusers():
    """The class-conditional LDM's f=8 VQ first stage, which has attention inside the levels."""
    ours = tiny_vq(LDM_CIN256.autoencoder)
    reference = diffusers_vq(ours)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    h = ours.encode(x)
    assert_close_to_reference(h, reference.encode(x).latents)
    assert_close_to_reference(ours.decode(h), reference.decode(h).sample)
