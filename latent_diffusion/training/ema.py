"""Exponential moving average of weights, the copy used for sampling and saved next to the model."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's float parameters: ``shadow = decay * shadow + (1 - decay) * param``.

    As CompVis ``LitEma`` the effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` so the
    average is not dominated by the random initialisation early in training.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (same parameter names)."""
        for name, param in module.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for name in self.shadow:
            self.shadow[name].copy_(state["shadow"][name])
