"""LoRAs merged into a model's weights, undone exactly.

Merging (rather than adding a side path to every layer) leaves the networks ordinary: lean, bf16
and compiled modes, and anything stacked on the UNet, see plain weights. Each changed weight is
replaced by a new tensor ``W + sum of the LoRAs' changes``; the tensor it replaced is kept, so that
switching or removing LoRAs puts back the very same tensor (bitwise, whatever the dtype). Where the
weights are mapped from the checkpoint file, the kept originals cost no memory of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from latent_diffusion.addons.lora_family import context_width, seems_made_for
from latent_diffusion.addons.lora_file import LoraFile, LoraLayer
from latent_diffusion.addons.lora_maths import fits, layer_delta
from latent_diffusion.addons.lora_targets import Target, lora_targets
from latent_diffusion.nn.packed import unpacked
from latent_diffusion.checkpoints.io import CheckpointError

SHOWN_KEYS = 5  # unmatched layers a message lists by name


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file at a strength for the UNet and one for the text encoders (A1111's two numbers)."""

    lora: LoraFile
    unet: float = 1.0
    text: float = 1.0


@dataclass(frozen=True)
class _Placed:
    layer: LoraLayer
    target: Target


def _target_shape(target: Target, shape: tuple[int, ...]) -> tuple[int, ...]:
    if target.rows is not None:
        return (target.rows[1] - target.rows[0], *shape[1:])
    return tuple(reversed(shape)) if target.transposed else shape


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else ""
    return ", ".join(names[:SHOWN_KEYS]) + more


class MergedLoras:
    """The LoRAs merged into one model's weights: :meth:`apply` a new set, ``apply([])`` to remove all."""

    def __init__(self, model: nn.Module, family, spec) -> None:
        self.model, self.family, self.spec = model, family, spec
        self._tables: dict[str, dict[str, Target]] | None = None
        self._originals: dict[str, Tensor] = {}  # key -> the tensor the merged one replaced
        self._active: tuple = ()

    @property
    def merged_keys(self) -> list[str]:
        return sorted(self._originals)

    def apply(self, uses: Sequence[LoraUse]) -> tuple[bool, list[str]]:
        """Merge exactly ``uses`` (replacing what was merged before): (whether any weight changed, warnings)."""
        signature = tuple((use.lora, use.unet, use.text) for use in uses)
        if signature == self._active:
            return False, []
        warnings: list[str] = []
        by_key: dict[str, list[tuple[_Placed, float]]] = {}
        for use in uses:
            for item in self._place(use.lora, warnings):
                strength = use.text if item.layer.is_text else use.unet
                if strength:
                    by_key.setdefault(item.target.key, []).append((item, strength))
        parameters = dict(self.model.named_parameters())
        with unpacked(self.model):  # weights packed for the CPU (nn/packed.py) merge in PyTorch's layout
            changed = self._restore(parameters, keep=by_key)
            try:
                for key, items in by_key.items():  # one weight at a time: one change in memory at a time
                    self._merge(parameters[key], key, items)
            except BaseException:
                self._restore(parameters, keep={})
                self._active = ()
                raise
        self._active = signature
        return changed or bool(by_key), warnings

    # ------------------------------------------------------------------ placing a file's layers
    def _place(self, lora: LoraFile, warnings: list[str]) -> list[_Placed]:
        """Each layer of ``lora`` with the weight it changes; errors when the file is for another model."""
        if self._tables is None:
            self._tables = lora_targets(self.model, self.family, self.spec)
        self._check_context(lora)
        components = {prefix: name for name, prefixes in self.family.lora_prefixes(self.spec).items()
                      for prefix in prefixes}
        shapes = {key: tuple(value.shape) for key, value in self.model.state_dict().items()}
        placed, unmatched = [], []
        for layer in lora.layers:
            target = self._tables.get(components.get(layer.prefix, ""), {}).get(layer.name)
            if target is not None and fits(layer, _target_shape(target, shapes[target.key])):
                placed.append(_Placed(layer, target))
            else:
                unmatched.append(f"{layer.prefix}{layer.name}")
        if not placed:
            seems = seems_made_for(lora.shapes, lora.metadata)
            raise CheckpointError(
                f"LoRA {lora.path}: none of its {len(lora.layers)} layers matches a layer of this "
                f"{self.family.name!r} model (e.g. {_listed(unmatched)}); "
                + (f"it seems made for {seems!r} models" if seems else "it is for another kind of model"))
        if unmatched:
            warnings.append(f"LoRA {lora.name}: {len(unmatched)} of its {len(lora.layers)} layers match no layer "
                            f"of this model and were left out: {_listed(unmatched)}")
        return placed

    def _check_context(self, lora: LoraFile) -> None:
        """A LoRA whose cross-attention reads another text width is for another family, even where
        some of its layers would fit this model's."""
        width = context_width(lora.shapes)
        ours = self.spec.unet.context_dim
        if width is not None and ours is not None and width != ours:
            seems = seems_made_for(lora.shapes, lora.metadata)
            raise CheckpointError(
                f"LoRA {lora.path} is for {seems or 'another kind of'!s} models (its cross-attention reads a "
                f"{width}-wide text context); this {self.family.name!r} model's reads {ours}")

    # ------------------------------------------------------------------ weights
    def _restore(self, parameters: dict[str, nn.Parameter], keep) -> bool:
        """Put back the original of every merged weight not in ``keep``; whether there was any."""
        restored = [key for key in self._originals if key not in keep]
        for key in restored:
            parameters[key].data = self._originals.pop(key)
        return bool(restored)

    def _merge(self, parameter: nn.Parameter, key: str, items: list[tuple[_Placed, float]]) -> None:
        # A weight merged before is merged again from its original, never from the merged one.
        original = self._originals.setdefault(key, parameter.data)
        exact = original.float()
        total = torch.zeros(original.shape, dtype=torch.float32)
        for item, strength in items:
            target = item.target
            base = exact[target.rows[0]:target.rows[1]] if target.rows else exact.t() if target.transposed else exact
            try:
                change = layer_delta(item.layer, base.cpu(), strength)
            except RuntimeError as error:  # factors whose shapes do not multiply
                raise CheckpointError(f"LoRA layer {item.layer.prefix}{item.layer.name}: malformed factors "
                                      f"({str(error).splitlines()[0]})") from None
            if target.rows is not None:
                total[target.rows[0]:target.rows[1]] += change
            else:
                total += change.t() if target.transposed else change
        parameter.data = (exact + total.to(original.device)).to(original.dtype)
