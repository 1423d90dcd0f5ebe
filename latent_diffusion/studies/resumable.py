"""A training loop that survives being stopped: state saved at fixed steps, work between them redone.

Every random draw of a step comes from a generator seeded by the step itself, so a step redone after
a restart is bitwise the step first done, and a resumed run ends where an unbroken one does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn


def step_generator(*keys: int) -> torch.Generator:
    """A generator for one step of one run: the same keys give the same draws on every machine."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def train_resumably(
    state_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    milestones: Iterable[int],
    step_fn: Callable[[int], None],
    on_milestone: Callable[[int], None] = lambda step: None,
) -> int:
    """Run ``step_fn(step)`` for the steps not yet done; after each milestone call ``on_milestone`` and
    save the state. Returns the step it started from (0 for a fresh run)."""
    marks = sorted(set(milestones) | {total_steps})
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    for step in range(start, total_steps):
        step_fn(step)
        if step + 1 in marks:
            on_milestone(step + 1)
            _save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1},
                             state_path)
    return start
