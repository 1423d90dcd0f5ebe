"""Where a LoRA layer lands in a loaded model: its name, as files spell it, to one of our weights.

Files name a layer by its module's name in the diffusers layout, or in the original one, with '.'
written '_' (kohya) or kept (PEFT). Our networks keep the original names, and
``checkpoints/diffusers_names.py`` already maps each weight to its diffusers name, so every weight
is listed here under both spellings. OpenCLIP keeps q, k and v in one fused projection whose thirds
diffusers splits into three layers; a LoRA on one of those lands on its third of the fused weight.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.families.base import Family


@dataclass(frozen=True)
class Target:
    """One of the model's weights (or a block of rows of it) that a LoRA layer may change."""

    key: str  # the model's state-dict key
    rows: tuple[int, int] | None = None  # [start, stop) of a fused weight (OpenCLIP's q/k/v)
    transposed: bool = False  # stored as the transpose of the linear layer's weight (bigG's projection)


def _module_name(rest: str) -> str | None:
    """The module a weight belongs to (None: not a layer's weight that LoRAs change)."""
    if rest.endswith(".in_proj_weight"):
        return rest[: -len("_weight")]
    return rest[: -len(".weight")] if rest.endswith(".weight") else None


def _diffusers_spellings(spec, keys: list[str]) -> dict[str, str]:
    """Our key -> its diffusers name, where the layout has one (a BERT text encoder has none)."""
    from latent_diffusion.checkpoints.convert import component_names

    try:
        return {key: name for key, (_part, name) in component_names(spec, keys).items()}
    except CheckpointError:
        names = {}
        for key in keys:
            try:
                names.update({k: name for k, (_part, name) in component_names(spec, [key]).items()})
            except CheckpointError:
                continue
        return names


def _under(name: str, target: Target, table: dict[str, Target]) -> None:
    table.setdefault(name.replace(".", "_"), target)


def _add_diffusers_name(table: dict[str, Target], key: str, name: str, width: int) -> None:
    if "{q,k,v}" in name:
        for index, letter in enumerate("qkv"):
            rows = (index * width, (index + 1) * width)
            _under(name.replace("{q,k,v}", letter).removesuffix(".weight"), Target(key, rows), table)
    elif name == "text_projection.weight":
        _under("text_projection", Target(key, transposed=True), table)
    elif name.endswith(".weight"):
        _under(name.removesuffix(".weight"), Target(key), table)


def lora_targets(model: nn.Module, family: Family, spec) -> dict[str, dict[str, Target]]:
    """For each network of the model that LoRAs adapt (the family's :meth:`~Family.lora_prefixes`):
    every spelling of a layer's name -> the weight it changes."""
    shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    prefixes = {part.name: part.prefix for part in family.components(spec)}
    tables: dict[str, dict[str, Target]] = {}
    for component in family.lora_prefixes(spec):
        prefix = prefixes[component]
        keys = [k for k in shapes if k.startswith(prefix) and len(shapes[k]) in (2, 4)]
        table: dict[str, Target] = {}
        for key in keys:
            module = _module_name(key[len(prefix):])
            if module is not None:
                _under(module, Target(key), table)
        for key, name in _diffusers_spellings(spec, keys).items():
            _add_diffusers_name(table, key, name, shapes[key][0] // 3)
        tables[component] = table
    return tables


def kohya_layer_names(model: nn.Module, family: Family, spec, keys: list[str]) -> dict[str, str]:
    """kohya's name (``lora_unet_...``, ``lora_te_...``) of the layer each of ``keys`` belongs to, for
    writing a LoRA file: the diffusers module name where the layout has one (what kohya's trainer
    writes for SD 1.x/2.x), else ours; every name is checked to read back as its weight."""
    prefixes = {part.name: part.prefix for part in family.components(spec)}
    tables = lora_targets(model, family, spec)
    names: dict[str, str] = {}
    for component, file_prefixes in family.lora_prefixes(spec).items():
        prefix = prefixes[component]
        own = [key for key in keys if key.startswith(prefix)]
        diffusers = _diffusers_spellings(spec, own)
        for key in own:
            name = diffusers.get(key, key[len(prefix):]).removesuffix(".weight").replace(".", "_")
            if tables[component].get(name) != Target(key):
                raise CheckpointError(f"{key}: no LoRA layer name of this {family.name!r} model reads back as it")
            names[key] = file_prefixes[0] + name
    unplaced = sorted(set(keys) - set(names))
    if unplaced:
        raise CheckpointError(f"{unplaced[0]}: not a weight of a network that LoRA files adapt")
    return names
