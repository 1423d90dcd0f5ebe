"""An optional compiled UNet: ``torch.compile`` with Inductor's weight freezing, for inference only.

Freezing turns the weights into constants of the compiled graph, so Inductor can pre-pack them in
oneDNN's blocked layouts once and fold the small ops around them, instead of reordering every
weight on every call as eager mode does. That is where the speed comes from on a CPU; the price is
the compile time on the first call (minutes for SD's UNet on two cores), a recompile for every new
latent size or batch, and a second, packed copy of the weights in memory.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_for_inference(module: nn.Module) -> nn.Module:
    """``module`` compiled with frozen weights; call it under ``torch.no_grad()`` (freezing is inference-only)."""
    if any(p.requires_grad for p in module.parameters()):
        module.requires_grad_(False)
    return torch.compile(module, dynamic=False, options={"freezing": True})
