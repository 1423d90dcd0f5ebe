"""LoRA / LyCORIS maths against PEFT's adapters and plain convolutions; merging undone bitwise; bad files.

PEFT's LoHa, LoKr and DoRA adapters are put on our own tiny UNet; their tensors, written as a
LyCORIS file, must give our merged UNet the output PEFT's adapted UNet gives.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_reference
from latent_diffusion.addons.lora_file import read_lora_file
from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
from latent_diffusion.checkpoints.io import CheckpointError, save_safetensors
from latent_diffusion.checkpoints.load import load_checkpoint
from lora_tiny import kohya_lora, layers
from pipeline_tiny import TINY_SD1, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
# A self-attention projection, a feed-forward output and a 3x3 ResNet convolution of the tiny UNet.
TARGETS = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.2",
           "input_blocks.1.0.in_layers.2", "output_blocks.1.1.proj_in"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(TINY_SD1, tmp_path_factory.mktemp("lora") / "model.safetensors")


def _merged(checkpoint, *uses: tuple, dtype=None):
    loaded = load_checkpoint(checkpoint, dtype=dtype)
    merged = MergedLoras(loaded.model, loaded.family, loaded.spec)
    merged.apply([LoraUse(read_lora_file(path), *weights) for path, *weights in uses])
    return loaded, merged


def _unet_output(unet, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 7, 32, generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([300]), context)


def _randomise_adapters(model, names: tuple[str, ...], generator):
    for name, parameter in model.named_parameters():
        if any(part in name for part in names):
            with torch.no_grad():
                if "magnitude" in name:  # a DoRA magnitude starts as the weight's norm: move it away
                    parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _adapter_file(model, parts: tuple[str, ...], path, alpha: float | None, prefix: str = "lora_unet_",
                  rename: dict[str, str] | None = None):
    """PEFT's adapter tensors of ``TARGETS`` as a LyCORIS / kohya file."""
    tensors = {}
    modules = dict(model.named_modules())
    for target in TARGETS:
        module = modules[target]
        key = prefix + target.replace(".", "_")
        for part in parts:
            holder = getattr(module, part, None)
            if holder is None or "default" not in holder:
                continue
            value = holder["default"]
            value = value.weight if hasattr(value, "weight") else value
            tensors[f"{key}.{(rename or {}).get(part, part)}"] = value.detach().clone().contiguous()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_safetensors(tensors, path)
    return path


def _peft_unet(checkpoint, config):
    from peft import inject_adapter_in_model

    loaded = load_checkpoint(checkpoint)
    return inject_adapter_in_model(config, copy.deepcopy(loaded.model.unet)).eval()


def _peft_merged(adapted):
    """The UNet with PEFT's adapters merged by PEFT (our attention reads the projections' weights
    directly, past the adapter layers' forward)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in adapted.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return adapted


LYCORIS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("effective_conv", [True, False], ids=["tucker-conv", "flat-conv"])
def test_lycoris_layers_equal_peft_adapters_on_the_same_tensors(checkpoint, tmp_path, kind, effective_conv):
    peft = pytest.importorskip("peft")
    options = dict(r=2, alpha=3.0, target_modules=TARGETS, use_effective_conv2d=effective_conv)
    config = peft.LoHaConfig(**options) if kind == "loha" else peft.LoKrConfig(**options)
    adapted = _peft_unet(checkpoint, config)
    _randomise_adapters(adapted, LYCORIS[kind], torch.Generator().manual_seed(5))
    path = _adapter_file(adapted, LYCORIS[kind], tmp_path / f"{kind}.safetensors", alpha=3.0)
    if effective_conv:
        assert any(key.endswith("_t1") or key.endswith("_t2") for key in read_lora_file(path).shapes)

    loaded, _ = _merged(checkpoint, (path, 1.0, 1.0))
    before = _unet_output(load_checkpoint(checkpoint).model.unet)
    theirs = _unet_output(_peft_merged(adapted))
    assert (theirs - before).abs().max() > 0.01 * theirs.abs().max()
    assert_close_to_reference(_unet_output(loaded.model.unet), theirs)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_dora_equals_peft_weight_decomposed_lora(checkpoint, tmp_path, layout):
    peft = pytest.importorskip("peft")
    adapted = _peft_unet(checkpoint, peft.LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, use_dora=True))
    _randomise_adapters(adapted, ("lora_A", "lora_B", "lora_magnitude_vector"), torch.Generator().manual_seed(6))
    parts = ("lora_A", "lora_B", "lora_magnitude_vector")
    if layout == "kohya":  # LyCORIS writes the magnitude as dora_scale, one per output row
        rename = dict(lora_A="lora_down.weight", lora_B="lora_up.weight", lora_magnitude_vector="dora_scale")
        path = _adapter_file(adapted, parts, tmp_path / "dora.safetensors", 2.0, rename=rename)
    else:
        rename = dict(lora_A="lora_A.weight", lora_B="lora_B.weight")
        path = _adapter_file(adapted, parts, tmp_path / "dora.safetensors", 2.0, prefix="unet.", rename=rename)

    loaded, _ = _merged(checkpoint, (path, 1.0, 1.0))
    assert_close_to_reference(_unet_output(loaded.model.unet), _unet_output(_peft_merged(adapted)))


@pytest.mark.parametrize("tucker", [False, True], ids=["locon", "locon-tucker"])
def test_conv_lora_equals_running_its_factors_as_convolutions(checkpoint, tmp_path, tucker):
    name = "input_blocks.1.0.in_layers.2"  # a 3x3 convolution, 32 -> 32 channels
    generator = torch.Generator().manual_seed(7)
    rank, alpha = 4, 3.0
    up = torch.randn(32, rank, 1, 1, generator=generator)
    if tucker:
        down, mid = torch.randn(rank, 32, 1, 1, generator=generator), torch.randn(rank, rank, 3, 3, generator=generator)
        factors = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    else:
        down, mid = torch.randn(rank, 32, 3, 3, generator=generator), None
        factors = {"lora_down.weight": down, "lora_up.weight": up}
    key = "lora_unet_" + name.replace(".", "_")
    path = tmp_path / "locon.safetensors"
    save_safetensors({**{f"{key}.{part}": t for part, t in factors.items()}, f"{key}.alpha": torch.tensor(alpha)}, path)

    before = dict(load_checkpoint(checkpoint).model.named_parameters())[f"model.diffusion_model.{name}.weight"]
    loaded, _ = _merged(checkpoint, (path, 0.5, 1.0))
    after = dict(loaded.model.named_parameters())[f"model.diffusion_model.{name}.weight"]
    x = torch.randn(1, 32, 6, 6, generator=generator)
    # The LoRA as its trainer runs it: down, (mid,) up as convolutions one after the other.
    h = F.conv2d(x, down, padding=0 if tucker else 1)
    h = F.conv2d(h, mid, padding=1) if tucker else h
    side_path = F.conv2d(h, up) * (alpha / rank) * 0.5
    with torch.no_grad():
        expected = F.conv2d(x, before, padding=1) + side_path
        assert_close_to_reference(F.conv2d(x, after, padding=1), expected)


def _two_loras(checkpoint, tmp_path):
    reference = load_checkpoint(checkpoint)
    modules = layers(reference.model.unet, re.compile(r".*(attn[12]\.to_[qkv]|in_layers\.2)"))
    texts = layers(reference.model.condition_encoder, re.compile(r".*self_attn\.(q|v)_proj"))
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"lora{seed}.safetensors"
        save_safetensors({**kohya_lora(modules, "lora_unet_", seed=seed),
                          **kohya_lora(texts, "lora_te_", seed=seed + 10)}, path)
        paths.append(path)
    return reference, paths


def test_two_loras_at_half_strength_sum_their_changes_and_unloading_restores_bitwise(checkpoint, tmp_path):
    reference, (first, second) = _two_loras(checkpoint, tmp_path)
    original = {k: v.clone() for k, v in reference.model.state_dict().items()}
    alone = [_merged(checkpoint, (path, 1.0, 1.0))[0].model.state_dict() for path in (first, second)]
    loaded, merged = _merged(checkpoint, (first, 0.5, 0.5), (second, 0.5, 0.5))
    both = loaded.model.state_dict()
    changed = [k for k in original if not torch.equal(both[k], original[k])]
    assert len(changed) == len(merged.merged_keys) > 10
    for key in changed:
        expected = 0.5 * (alone[0][key] - original[key]) + 0.5 * (alone[1][key] - original[key])
        assert_close_to_reference(both[key] - original[key], expected, rel=1e-5)

    merged.apply([LoraUse(read_lora_file(second), 1.0, 1.0)])  # switching: as if only the second were loaded
    assert all(torch.equal(loaded.model.state_dict()[k], alone[1][k]) for k in original)
    merged.apply([])
    assert all(torch.equal(loaded.model.state_dict()[k], original[k]) for k in original)
    assert merged.merged_keys == []


def test_unloading_restores_half_precision_weights_bitwise(checkpoint, tmp_path):
    reference, (first, _) = _two_loras(checkpoint, tmp_path)
    loaded, merged = _merged(checkpoint, (first, 0.7, 0.3), dtype=torch.float16)
    original = load_checkpoint(checkpoint, dtype=torch.float16).model.state_dict()
    assert any(not torch.equal(loaded.model.state_dict()[k], original[k]) for k in original)
    merged.apply([])
    assert all(torch.equal(loaded.model.state_dict()[k], original[k]) for k in original)


# ---------------------------------------------------------------------------------------------- bad input
def _apply(checkpoint, tensors, tmp_path, name="bad.safetensors"):
    path = tmp_path / name
    save_safetensors(tensors, path)
    return _merged(checkpoint, (path, 1.0, 1.0))


def test_an_sdxl_lora_on_an_sd1_model_names_the_family_it_is_for(checkpoint, tmp_path):
    # An SDXL cross-attention key layer (2048-wide context) and a self-attention layer whose name
    # and shape an SD 1 model also has: the LoRA is refused whole, not applied in part.
    tensors = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 32),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 4)}
    with pytest.raises(CheckpointError, match=r"bad\.safetensors is for sdxl models .*2048-wide.* 'sd1' model's reads 32"):
        _apply(checkpoint, tensors, tmp_path)


def test_a_lora_matching_no_layer_is_an_error_and_a_partial_match_lists_what_was_left_out(checkpoint, tmp_path):
    stray = {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
             "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4)}
    with pytest.raises(CheckpointError, match=r"none of its 1 layers matches a layer of this 'sd1' model "
                                              r"\(e\.g\. lora_unet_down_blocks_9_attentions_0_proj_in\)"):
        _apply(checkpoint, stray, tmp_path)
    good = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1),
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1)}
    loaded = load_checkpoint(checkpoint)
    path = tmp_path / "partial.safetensors"
    save_safetensors({**stray, **good}, path)
    changed, warnings = MergedLoras(loaded.model, loaded.family, loaded.spec).apply([LoraUse(read_lora_file(path))])
    assert changed and len(warnings) == 1
    assert "partial: 1 of its 2 layers match no layer" in warnings[0] and "down_blocks_9_attentions_0_proj_in" in warnings[0]


def test_corrupt_truncated_and_foreign_files_are_named(checkpoint, tmp_path):
    good = kohya_lora(layers(load_checkpoint(checkpoint).model.unet, re.compile(r".*attn1\.to_q")), "lora_unet_")
    path = tmp_path / "cut.safetensors"
    save_safetensors(good, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        read_lora_file(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a lora at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a checkpoint"):
        read_lora_file(garbage)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a LoRA file.*full checkpoint"):
        read_lora_file(checkpoint)
    oft = tmp_path / "oft.safetensors"
    save_safetensors({"lora_unet_x_attn1_to_q.oft_blocks": torch.randn(4, 8, 8)}, oft)
    with pytest.raises(CheckpointError, match="oft.safetensors: holds OFT layers"):
        read_lora_file(oft)
    half = tmp_path / "half.safetensors"
    save_safetensors({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1)}, half)
    with pytest.raises(CheckpointError, match=r"half.safetensors: LoRA layer lora_unet_input_blocks_1_1_proj_in lacks its up"):
        read_lora_file(half)
