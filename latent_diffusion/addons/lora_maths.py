"""The weight change each kind of LoRA layer stands for, in float32.

* LoRA (Hu et al. 2021): ``up @ down * alpha / rank``; a convolution's ``down`` carries the kernel
  (LoCon), or a ``mid`` core does (``up``, ``mid``, ``down`` a Tucker decomposition);
* LoHa: the elementwise product of two low-rank products, ``(w1a @ w1b) * (w2a @ w2b) * alpha / rank``
  (with Tucker cores ``t1``/``t2`` for convolutions);
* LoKr: the Kronecker product of two factors, each given whole or as a low-rank product;
  ``alpha / rank`` applies when a factor is low-rank, else the scale is 1;
* DoRA (weight decomposition): the changed weight rescaled to the stored magnitude of each output
  row (or input column, in older files), ``m * (W + dW) / ||W + dW||``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from latent_diffusion.addons.lora_file import LoraLayer


def _tucker(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    """A convolution kernel from a Tucker core ``[r, r, kh, kw]`` and factors ``[r, out]``, ``[r, in]``."""
    return torch.einsum("abhw,ao,bi->oihw", core, out_factor, in_factor)


def _f(layer: LoraLayer, part: str) -> Tensor:
    return layer.tensors[part].float()


def _lora_product(layer: LoraLayer) -> tuple[Tensor, int]:
    up, down = _f(layer, "up").flatten(1), _f(layer, "down")
    if "mid" in layer.tensors:
        mid = _f(layer, "mid")
        return torch.einsum("or,rshw,si->oihw", up, mid, down.flatten(1)), down.shape[0]
    return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]), down.shape[0]


def _loha_product(layer: LoraLayer) -> tuple[Tensor, int]:
    if "hada_t1" in layer.tensors:
        first = _tucker(_f(layer, "hada_t1"), _f(layer, "hada_w1_a"), _f(layer, "hada_w1_b"))
        second = _tucker(_f(layer, "hada_t2"), _f(layer, "hada_w2_a"), _f(layer, "hada_w2_b"))
    else:
        first = _f(layer, "hada_w1_a") @ _f(layer, "hada_w1_b")
        second = _f(layer, "hada_w2_a") @ _f(layer, "hada_w2_b")
    return first * second, layer.tensors["hada_w1_b"].shape[0]


def _lokr_factor(layer: LoraLayer, index: int) -> tuple[Tensor, int | None]:
    """One Kronecker factor and its rank (None: stored whole)."""
    whole = f"lokr_w{index}"
    if whole in layer.tensors:
        return _f(layer, whole), None
    a, b = _f(layer, f"{whole}_a"), _f(layer, f"{whole}_b")
    if f"lokr_t{index}" in layer.tensors:
        return _tucker(_f(layer, f"lokr_t{index}"), a, b), b.shape[0]
    return a @ b, b.shape[0]


def _lokr_product(layer: LoraLayer) -> tuple[Tensor, int | None]:
    first, first_rank = _lokr_factor(layer, 1)
    second, second_rank = _lokr_factor(layer, 2)
    while first.dim() < second.dim():
        first = first.unsqueeze(-1)
    return torch.kron(first.contiguous(), second.contiguous()), second_rank if second_rank is not None else first_rank


def product_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The shape of the layer's weight change, from its factors' shapes alone (no arithmetic)."""
    t = {part: tuple(tensor.shape) for part, tensor in layer.tensors.items()}
    kind = layer.kind
    if kind == "lora":
        down = t["down"]
        return (t["up"][0], down[1], *t["mid"][2:]) if "mid" in t else (t["up"][0], *down[1:])
    if kind == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"][1], t["hada_w1_b"][1], *t["hada_t1"][2:])
        return t["hada_w1_a"][0], t["hada_w1_b"][1]
    if kind == "lokr":
        first = t.get("lokr_w1") or (t["lokr_w1_a"][0], t["lokr_w1_b"][1])
        if "lokr_w2" in t:
            second = t["lokr_w2"]
        elif "lokr_t2" in t:
            second = (t["lokr_w2_a"][1], t["lokr_w2_b"][1], *t["lokr_t2"][2:])
        else:
            second = (t["lokr_w2_a"][0], t["lokr_w2_b"][1])
        return (first[0] * second[0], first[1] * second[1], *second[2:])
    return t["diff"]


def fits(layer: LoraLayer, weight_shape: tuple[int, ...]) -> bool:
    """Whether the layer's change has the weight's size (a linear change fits a 1x1 convolution and back)."""
    shape = product_shape(layer)
    return shape[0] == weight_shape[0] and math.prod(shape) == math.prod(weight_shape)


def layer_delta(layer: LoraLayer, original: Tensor, strength: float) -> Tensor:
    """The float32 change of ``original`` (the layer's unchanged weight) at ``strength`` (the user's weight)."""
    kind = layer.kind
    if kind == "full":
        product, rank = _f(layer, "diff"), None
    else:
        product, rank = {"lora": _lora_product, "loha": _loha_product, "lokr": _lokr_product}[kind](layer)
    scale = layer.alpha / rank if layer.alpha is not None and rank else 1.0
    delta = product.reshape(original.shape) * (scale * strength)
    if "dora_scale" in layer.tensors:
        return _decomposed(layer, original.float(), delta)
    return delta


def _decomposed(layer: LoraLayer, weight: Tensor, delta: Tensor) -> Tensor:
    """DoRA: the change that gives ``W + dW`` the stored magnitude along its output rows (or input columns)."""
    changed = weight + delta
    magnitude = _f(layer, "dora_scale")
    if magnitude.numel() == weight.shape[0]:
        norm = changed.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        magnitude = magnitude.reshape(norm.shape)
    elif weight.dim() > 1 and magnitude.numel() == weight.shape[1]:
        norm = changed.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
        magnitude = magnitude.reshape(norm.shape)
    else:
        raise ValueError(f"LoRA layer {layer.prefix}{layer.name}: dora_scale of shape "
                         f"{tuple(layer.tensors['dora_scale'].shape)} fits neither side of a {tuple(weight.shape)} weight")
    return changed * (magnitude / norm) - weight
