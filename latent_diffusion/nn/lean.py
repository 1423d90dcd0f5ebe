"""Lean mode: weights stored in half precision, each block computed in float32.

On CPUs without half-precision arithmetic (bf16/fp16 matmuls and convolutions are many times
slower than fp32 there), storing the weights in fp16 halves the model's memory while the compute
stays fp32: before a block runs, its weights are upcast; after, the fp32 copies are dropped. Only
one block's fp32 weights exist at a time.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Blocks up to this many parameters are upcast as one unit (SD 1.5's largest is about 35M).
DEFAULT_UNIT_PARAMETERS = 50_000_000
# Smaller units stay in the compute dtype: they save little, and the UNet takes its input dtype from
# its (small) timestep MLP, which must therefore stay fp32 for the inputs not to be rounded to fp16.
MIN_STORED_PARAMETERS = 4_000_000


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _units(module: nn.Module, limit: int) -> list[nn.Module]:
    """The largest subtrees of at most ``limit`` parameters (a module holding its own tensors is always one)."""
    own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    # Lists of blocks are never called themselves, so their hooks would never run.
    container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
    if own or (_parameter_count(module) <= limit and not container):
        return [module] if _parameter_count(module) or own else []
    return [unit for child in module.children() for unit in _units(child, limit)]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def make_lean(model: nn.Module, storage_dtype: torch.dtype = torch.float16,
              compute_dtype: torch.dtype = torch.float32, unit_parameters: int = DEFAULT_UNIT_PARAMETERS,
              min_parameters: int = MIN_STORED_PARAMETERS) -> nn.Module:
    """Store the weights of ``model``'s blocks as ``storage_dtype``; compute each block in ``compute_dtype``.

    ``model`` must call its blocks as modules (true of the UNet and the autoencoders; not of our
    text encoders, which call their body's parts by method): a block whose weights its parent reads
    directly would keep them in half precision. ``model``'s own tensors and small blocks stay in
    ``compute_dtype``.
    """
    if not (storage_dtype.is_floating_point and compute_dtype.is_floating_point):
        raise ValueError(f"lean mode needs floating dtypes, got {storage_dtype} and {compute_dtype}")
    # Converted unit by unit, so that a model loaded in half precision never exists whole in fp32.
    for name, tensor in list(model._parameters.items()) + list(model._buffers.items()):
        if tensor is not None and tensor.is_floating_point():
            (model._parameters if name in model._parameters else model._buffers)[name] = (
                torch.nn.Parameter(tensor.detach().to(compute_dtype), requires_grad=tensor.requires_grad)
                if name in model._parameters else tensor.to(compute_dtype))
    for unit in [u for child in model.children() for u in _units(child, unit_parameters)]:
        if _parameter_count(unit) < min_parameters:
            unit.to(compute_dtype)
            continue
        unit.to(storage_dtype)
        stored: dict[tuple[nn.Module, str], torch.Tensor] = {}

        def upcast(module: nn.Module, args: tuple, kwargs: dict, stored=stored):
            for owner in module.modules():
                for name, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
                    if tensor is not None and tensor.is_floating_point():
                        stored[(owner, name)] = tensor
                        table = owner._parameters if name in owner._parameters else owner._buffers
                        table[name] = tensor.detach().to(compute_dtype)
            return _cast(args, compute_dtype), _cast(kwargs, compute_dtype)

        def restore(module: nn.Module, args: tuple, kwargs: dict, output: Any, stored=stored):
            for (owner, name), tensor in stored.items():
                table = owner._parameters if name in owner._parameters else owner._buffers
                table[name] = tensor
            stored.clear()
            return output

        unit.register_forward_pre_hook(upcast, with_kwargs=True)
        unit.register_forward_hook(restore, with_kwargs=True)
    return model
