"""What a checkpoint holds, without loading it: family, sizes, dtypes, EMA, schedule.

Only the few small schedule buffers are read; the weights stay on disk (safetensors are answered
from the header and memory map, pickles through ``torch.load(mmap=True)``), and parameter counts
come from the tensors' shapes.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict, sniff_format
from latent_diffusion.checkpoints.load import EMA_PREFIX, build_on_meta, described_spec, resolve_spec
from latent_diffusion.checkpoints.schedule_buffers import read_training_schedule


def describe_checkpoint(
    path: str | os.PathLike, *, family: str | None = None, prediction: str | None = None,
    config_yaml: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary of a single-file checkpoint (same overrides as ``load_checkpoint``)."""
    path = Path(path)
    file_format = sniff_format(path)
    state_dict = read_state_dict(path)  # lazy: memory-mapped, nothing is read until touched
    stated = described_spec(state_dict, path=path, family=family, config_yaml=config_yaml)
    spec, found = resolve_spec(state_dict, family=family, prediction=prediction, spec=stated)
    model_keys = set(build_on_meta(spec).state_dict())

    parameters: dict[str, int] = {}
    dtypes: dict[str, dict[str, int]] = {}
    parts: dict[str, str] = {}
    for component in found.components(spec):
        tensors = [t for k, t in state_dict.items() if k.startswith(component.prefix) and k in model_keys]
        parameters[component.name] = sum(t.numel() for t in tensors)
        dtypes[component.name] = dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors))
        parts[component.name] = component.what
    ema_tensors = [t for k, t in state_dict.items()
                   if k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates")]
    try:
        stored = read_training_schedule({k: state_dict[k] for k in ("betas", "alphas_cumprod") if k in state_dict})
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    schedule = stored.config if stored is not None and stored.config is not None else spec.schedule
    return {
        "file": str(path),
        "format": file_format,
        "file_size_bytes": path.stat().st_size,
        "family": spec.family,
        "description": found.description,
        "prediction": spec.prediction,
        "prediction_from": "argument" if prediction else (
            "yaml" if config_yaml else ("file metadata" if stated is not None else "family default")),
        "conditioning": spec.conditioning,
        "parameters": parameters,
        "dtypes": dtypes,
        "parts": parts,
        "ema": {"present": bool(ema_tensors), "tensors": len(ema_tensors),
                "parameters": sum(t.numel() for t in ema_tensors)},
        "schedule": {
            "source": "file buffers" if stored is not None else (
                "yaml" if config_yaml else ("file metadata" if stated is not None else "family preset")),
            "kind": schedule.kind if stored is None or stored.config is not None else "custom",
            "timesteps": schedule.timesteps, "linear_start": schedule.linear_start, "linear_end": schedule.linear_end,
        },
        "scale_factor": spec.scale_factor,
        "latent_channels": spec.latent_channels,
        "downsampling_factor": spec.downsampling_factor,
        "other_tensors": sum(1 for k in state_dict if k not in model_keys and not k.startswith(EMA_PREFIX)),
    }


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,}"


def format_description(description: dict[str, Any]) -> str:
    """Human-readable lines for :func:`describe_checkpoint`'s result (for ``ldm info``)."""
    d = description
    size = d["file_size_bytes"] / 2**30
    lines = [
        f"file:        {d['file']} ({d['format']}, {size:.2f} GiB)",
        f"family:      {d['family']} - {d['description']}",
        f"prediction:  {d['prediction']} ({d['prediction_from']})",
        f"conditioning: {d['conditioning']}",
    ]
    for component, count in d["parameters"].items():
        kinds = ", ".join(f"{k} x{n}" for k, n in d["dtypes"][component].items()) or "-"
        lines.append(f"  {component:<15}{_count(count):>12} parameters   [{kinds}]  {d['parts'][component]}")
    ema = d["ema"]
    lines.append(f"EMA weights: {'yes, ' + _count(ema['parameters']) + ' parameters' if ema['present'] else 'no'}")
    s = d["schedule"]
    lines.append(f"schedule:    {s['kind']} beta {s['linear_start']:g} -> {s['linear_end']:g}, "
                 f"{s['timesteps']} steps (from {s['source']})")
    lines.append(f"latents:     {d['latent_channels']} channels, /{d['downsampling_factor']}, scale {d['scale_factor']:g}")
    return "\n".join(lines)
