"""Training-state checkpoints: written atomically, the last N kept, and everything needed to resume.

A state file holds the networks, EMA, optimisers, step and RNG states. The data position and the
learning rate are functions of the step (see ``data.ShardedBatches`` and ``loop.learning_rate``),
so restoring the step restores them too.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from latent_diffusion.checkpoints.io import atomic_write

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}.pt"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete state files, oldest first (temporary files of an interrupted write are ignored)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    with atomic_write(path) as out:
        torch.save(obj, out)


def rng_states() -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(_as_tuple(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def save_training_state(out_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write ``state`` for ``step`` and delete all but the newest ``keep_last`` state files."""
    path = checkpoint_path(out_dir, step)
    atomic_torch_save({**state, "step": step, "rng": rng_states()}, path)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_latest_training_state(out_dir: Path) -> dict | None:
    """The newest complete state file of ``out_dir`` (None when there is none)."""
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        return None
    # Our own files: plain containers of tensors and numbers, so the weights-only unpickler suffices
    # (numpy's RNG state is a dict of ints and arrays, allowed below).
    with torch.serialization.safe_globals([np.ndarray, np.dtype, np.core.multiarray._reconstruct, type(np.dtype("uint32"))]):
        return torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
