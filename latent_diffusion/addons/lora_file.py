"""LoRA and LyCORIS files as users have them: their keys grouped into one entry per adapted layer.

Layouts read (the layer's name is its module's name in the network, with '.' written '_'):

* kohya / A1111: ``lora_unet_<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (and
  ``.lora_mid.weight`` for convolutions split in three), text encoders under ``lora_te_`` (SDXL:
  ``lora_te1_`` and ``lora_te2_``). Names are diffusers' module names, or the original ones
  (kohya's SDXL trainer);
* LyCORIS under the same names: LoHa (``hada_w1_a`` ...), LoKr (``lokr_w1`` ...), whole
  differences (``diff``), with ``dora_scale`` where trained with weight decomposition (DoRA);
* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, text encoders under
  ``text_encoder.`` and ``text_encoder_2.`` (also the older ``lora.down`` / ``lora_linear_layer``
  and attention-processor spellings); their alphas come from the ``lora_adapter_metadata`` that
  diffusers writes (none: alpha equals the rank).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from latent_diffusion.checkpoints.io import CheckpointError, read_safetensors_metadata, read_state_dict, sniff_format

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder_2.", "text_encoder.")

# File suffix -> the part of a layer it holds.
_PARTS = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha", "dora_scale": "dora_scale",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
    **{f"hada_{part}": f"hada_{part}" for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{part}": f"lokr_{part}" for part in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": "diff",
}
_SUFFIXES = sorted(_PARTS, key=len, reverse=True)
# Networks of other kinds, recognised so that the error can say what the file is.
_OTHER_KINDS = {"oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT", "on_input": "(IA)^3", "a1.weight": "GLoRA",
                "a2.weight": "GLoRA", "w_norm": "norm-layer", "b_norm": "norm-layer", "diff_b": "bias"}
# diffusers' attention-processor files: ``<attention>.processor.to_q_lora.down.weight`` (UNet only).
_PROCESSOR = re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


@dataclass
class LoraLayer:
    """The factors one file holds for one layer."""

    prefix: str  # which network: "lora_unet_", "lora_te_", "text_encoder." ...
    name: str  # the module's name inside that network, '.' written '_'
    module: str  # the module's name as the file spells it (PEFT's alpha patterns match it)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """"lora", "loha", "lokr" or "full" (a whole-weight difference)."""
        if any(part.startswith("hada_") for part in self.tensors):
            return "loha"
        if any(part.startswith("lokr_") for part in self.tensors):
            return "lokr"
        return "full" if "diff" in self.tensors else "lora"

    @property
    def is_text(self) -> bool:
        return not self.prefix.startswith(("lora_unet_", "unet."))


@dataclass(eq=False)  # one file read once: equal only to itself
class LoraFile:
    """A LoRA / LyCORIS file, read: its layers, and the keys that belong to no layer."""

    path: Path
    layers: list[LoraLayer]
    metadata: dict[str, str]
    stray_keys: list[str]
    shapes: dict[str, tuple[int, ...]]  # every key's shape, as in the file

    @property
    def name(self) -> str:
        return self.path.stem


_REQUIRED = {"lora": (("down",), ("up",)), "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
             "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")), "full": (("diff",),)}


def split_key(key: str) -> tuple[str, str, str] | None:
    """(network prefix, module as spelt, part) of one file key; None when it names no layer's part."""
    processor = _PROCESSOR.match(key)
    if processor:
        proj = processor["proj"] + (".0" if processor["proj"] == "to_out" else "")
        module, part = f"{processor['module']}.{proj}", processor["part"]
    else:
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            return None
        module, part = key[: -len(suffix) - 1], _PARTS[suffix]
    for prefix in KOHYA_PREFIXES + DIFFUSERS_PREFIXES:
        if module.startswith(prefix):
            return prefix, module[len(prefix):], part
    if module.startswith(_UNET_BLOCKS):  # attention-processor files name no network: the UNet's
        return "unet.", module, part
    return None


def _adapter_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata``: per network prefix, its LoRA config ({} when absent)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    configs: dict[str, dict] = {}
    for key, value in packed.items() if isinstance(packed, dict) else ():
        network, _, setting = key.rpartition(".")
        configs.setdefault(network + ".", {})[setting] = value
    return configs


def _peft_alpha(layer: LoraLayer, configs: dict[str, dict]) -> float | None:
    config = configs.get(layer.prefix)
    if not config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if layer.module == pattern or layer.module.endswith("." + pattern):
            config = {**config, "lora_alpha": alpha}
            break
    if config.get("lora_alpha") is None:
        return None
    alpha = float(config["lora_alpha"])
    # rank-stabilised LoRA scales by alpha / sqrt(rank); our maths divides alpha by the rank.
    return alpha * math.sqrt(layer.tensors["down"].shape[0]) if config.get("use_rslora") and "down" in layer.tensors else alpha


def _check_complete(path: Path, layer: LoraLayer) -> None:
    for alternatives in _REQUIRED[layer.kind]:
        if not any(part in layer.tensors for part in alternatives):
            raise CheckpointError(f"{path}: LoRA layer {layer.prefix}{layer.name} lacks its "
                                  f"{' or '.join(alternatives)} tensor (a damaged or incomplete file)")


def _refuse_other_kinds(path: Path, keys: list[str]) -> None:
    for key in keys:
        for suffix, kind in _OTHER_KINDS.items():
            if key.endswith("." + suffix):
                raise CheckpointError(f"{path}: holds {kind} layers (e.g. {key}), which are not supported; "
                                      "LoRA, LoCon, LoHa, LoKr and DoRA files are")


def read_lora_file(path: str | Path) -> LoraFile:
    """A LoRA / LyCORIS file read into layers; errors name the file and what is wrong with it."""
    path = Path(path)
    state = read_state_dict(path)
    metadata = read_safetensors_metadata(path) if sniff_format(path) == "safetensors" else {}
    layers: dict[tuple[str, str], LoraLayer] = {}
    stray: list[str] = []
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            stray.append(key)
            continue
        prefix, module, part = split
        layer = layers.setdefault((prefix, module.replace(".", "_")),
                                  LoraLayer(prefix, module.replace(".", "_"), module))
        layer.keys.append(key)
        if part == "alpha":
            layer.alpha = float(tensor.float().reshape(-1)[0]) if tensor.numel() else None
        else:
            layer.tensors[part] = tensor
    _refuse_other_kinds(path, stray)
    if not layers:
        shown = ", ".join(sorted(state)[:3])
        raise CheckpointError(f"{path}: not a LoRA file: none of its {len(state)} keys is a LoRA layer's "
                              f"(they start {shown}); a full checkpoint goes to --checkpoint")
    configs = _adapter_alphas(metadata)
    for layer in layers.values():
        if not layer.tensors:
            raise CheckpointError(f"{path}: LoRA layer {layer.prefix}{layer.name} has an alpha but no weights")
        _check_complete(path, layer)
        if layer.alpha is None and layer.prefix in DIFFUSERS_PREFIXES:
            layer.alpha = _peft_alpha(layer, configs)
        _check_finite(path, layer)
    return LoraFile(path, list(layers.values()), metadata, stray, {k: tuple(v.shape) for k, v in state.items()})


def _check_finite(path: Path, layer: LoraLayer) -> None:
    if layer.alpha is not None and not torch.isfinite(torch.tensor(layer.alpha)):
        raise CheckpointError(f"{path}: LoRA layer {layer.prefix}{layer.name} has alpha {layer.alpha}")
    for part, tensor in layer.tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: LoRA tensor {layer.prefix}{layer.name}.{part} is {tensor.dtype}, "
                                  "not floating point")
