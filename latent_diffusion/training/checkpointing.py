"""Training-state checkpoints: written atomically, the last N kept, and everything needed to resume.

A state file holds the networks, EMA, optimisers, step and RNG states. The data position and the
learning rate are functions of the step (see ``data.ShardedBatches`` and ``loop.learning_rate``),
so restoring the step restores them too. A state file that cannot be read is set aside (renamed,
never deleted) and the one before it is used.
"""
from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from latent_diffusion.checkpoints.io import atomic_write
from latent_diffusion.config import ConfigError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})\.pt$")
# ``atomic_write``'s temporary files: ".<final name>.<8 random characters>.tmp" beside the final file.
_TEMP_SUFFIX = r"\.[a-z0-9_]{8}\.tmp$"
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)


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


def remove_orphan_temp_files(out_dir: Path, final_names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files that a run killed while saving left in ``out_dir``; the paths removed.

    Only our own pattern is touched: ``.step-NNNNNNNN.pt.XXXXXXXX.tmp`` in ``checkpoints/`` and
    ``.<name>.XXXXXXXX.tmp`` in ``out_dir`` for each of ``final_names`` (the files the run exports).
    """
    out_dir = Path(out_dir)
    patterns = [(out_dir / "checkpoints", re.compile(r"^\.step-\d{8}\.pt" + _TEMP_SUFFIX))]
    patterns += [(out_dir, re.compile("^" + re.escape("." + name) + _TEMP_SUFFIX)) for name in final_names]
    removed = []
    for folder, pattern in patterns:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if pattern.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    if removed:
        log.info("removed %d unfinished temporary file(s) of a save that was interrupted: %s",
                 len(removed), ", ".join(str(p) for p in removed))
    return removed


def read_training_state(path: Path) -> dict:
    """A state file's contents; a file that cannot be read raises one of ``_READ_ERRORS``."""
    # Our own files: plain containers of tensors and numbers, so the weights-only unpickler suffices
    # (numpy's RNG state is a dict of ints and arrays, allowed below).
    numpy_core = getattr(np, "_core", None) or np.core  # renamed in NumPy 2
    numpy_types = [np.ndarray, np.dtype, numpy_core.multiarray._reconstruct, type(np.dtype("uint32"))]
    with torch.serialization.safe_globals(numpy_types):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
        raise ValueError("not a training state file (no step and RNG states)")
    return state


def load_latest_training_state(out_dir: Path, *, is_main: bool = True) -> tuple[dict, Path] | None:
    """The newest readable state file of ``out_dir`` and its path (None when there is none).

    Unreadable newer files (cut short, overwritten) are renamed to ``<name>.corrupt`` by rank 0 with a
    warning, so later saves and ``keep_last`` never touch them; when no file can be read that is an error.
    """
    unreadable = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            state = read_training_state(path)
        except _READ_ERRORS as error:
            unreadable.append((path, error))
            continue
        for bad, error in unreadable:
            _set_aside(bad, error, path, is_main)
        return state, path
    if unreadable:
        listed = "; ".join(f"{p.name}: {_first_line(e)}" for p, e in unreadable)
        raise ConfigError(
            f"no checkpoint in {Path(out_dir) / 'checkpoints'} can be read ({listed}); "
            "start a new run with another run.out_dir, or move those files away to train from scratch here"
        )
    return None


def _set_aside(bad: Path, error: BaseException, used: Path, is_main: bool) -> None:
    if not is_main:
        return
    kept = bad.with_name(bad.name + ".corrupt")
    try:
        bad.replace(kept)
    except OSError as rename_error:
        log.warning("checkpoint %s cannot be read (%s) nor renamed (%s); resuming from %s instead",
                    bad, _first_line(error), rename_error, used.name)
        return
    log.warning("checkpoint %s cannot be read (%s); kept as %s, resuming from %s instead",
                bad, _first_line(error), kept.name, used.name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
