"""Load a single-file checkpoint strictly into a :class:`LatentDiffusion`.

The model is built on the meta device and the file's tensors are assigned to it, so loading does
no random initialisation and keeps no second copy of the weights (safetensors stay memory-mapped
until a dtype conversion needs new memory). Every tensor in the file is either loaded or
recognised and set aside for a stated reason; anything else, and anything missing, is an error
that names the keys.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.overrides import TorchFunctionMode

from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict, release_file_pages
from latent_diffusion.checkpoints.schedule_buffers import TrainingSchedule, read_training_schedule
from latent_diffusion.config import ModelSpec
from latent_diffusion.families import Family, detect, get_family, read_features, shapes_of
from latent_diffusion.families.features import UNET_PREFIX
from latent_diffusion.models.ldm import LatentDiffusion

EMA_PREFIX = "model_ema."
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


@dataclass(frozen=True)
class EMAInfo:
    """The exponential moving average of the UNet weights that CompVis' ``LitEma`` stores."""

    present: bool
    used: bool
    decay: float | None = None
    num_updates: int | None = None
    tensors: int = 0


@dataclass
class LoadedModel:
    """A loaded model with what the file told us about it."""

    model: LatentDiffusion
    spec: ModelSpec
    family: Family
    source: Path | None
    training_schedule: TrainingSchedule | None  # from the file's buffers; None when it has none
    ema: EMAInfo
    dtype: torch.dtype | None  # None: the file's dtypes were kept
    file_dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> number of tensors
    # Recognised tensors that are not network weights: reason -> keys.
    set_aside: dict[str, list[str]] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """The family, in words."""
        return self.family.description


def ema_key(model_key: str) -> str:
    """Where ``LitEma`` keeps the average of ``model.<name>``: dots are removed (buffer names cannot hold them)."""
    return EMA_PREFIX + model_key[len("model."):].replace(".", "")


def _list_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else f"{shown} ({len(keys)})"


def _apply_ema(state_dict: dict[str, torch.Tensor], unet_keys: list[str]) -> None:
    names = {ema_key(k): k for k in unet_keys}
    if len(names) != len(unet_keys):
        raise CheckpointError("UNet parameter names collide once dots are removed; cannot map the EMA weights")
    missing = [e for e in names if e not in state_dict]
    if missing:
        raise CheckpointError(f"use_ema=True, but EMA weights are missing for: {_list_keys(missing)}")
    for ema_name, model_key in names.items():
        state_dict[model_key] = state_dict[ema_name]


def _convert_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, prefix: str = "") -> None:
    if dtype is None:
        return
    for key, tensor in tensors.items():
        if key.startswith(prefix) and tensor.is_floating_point() and tensor.dtype != dtype:
            tensors[key] = tensor.to(dtype)  # replaced in place, so the source can be freed as we go
            release_file_pages(tensor)


def check_weights_fit(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """CheckpointError naming the missing, unexpected and misshapen keys when ``weights`` cannot load
    strictly into a module whose state dict is ``expected`` (``what`` names that module)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing: {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_list_keys(unexpected)}")
        raise CheckpointError(f"the file does not fit the {what}; " + "; ".join(parts))
    wrong = [
        f"{k}: file {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
        for k, t in weights.items() if tuple(t.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(f"tensor shapes do not fit the {what}: {_list_keys(wrong)}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` -> float32 (compute in fp32 on CPU); ``"keep"`` -> the file's own dtypes; or a float dtype."""
    if dtype is None:
        return torch.float32
    if dtype == "keep":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating torch dtype, 'keep' or None, got {dtype!r}")
    return dtype


class _SkipInitialisation(TorchFunctionMode):
    """Leaves ``torch.nn.init`` calls out: meta tensors hold no values to initialise, and ``normal_`` on
    the meta device would import torch._dynamo (1.5 s of every command's start)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


def build_on_meta(spec: ModelSpec) -> LatentDiffusion:
    """The model with shapes only (no memory, no initialisation), ready for ``load_state_dict(assign=True)``."""
    with torch.device("meta"), _SkipInitialisation():
        return LatentDiffusion(spec)


def assign_weights(model: LatentDiffusion, weights: dict[str, torch.Tensor], family: str) -> None:
    """Strictly assign ``weights`` to a meta-built model; errors name missing, unexpected and misshapen keys."""
    check_weights_fit(weights, model.state_dict(), f"{family!r} model")
    model.load_state_dict(weights, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"internal: tensors not covered by the state dict: {_list_keys(left_on_meta)}")
    model.eval()


def _dtype_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors.values()))


def _set_aside(state_dict: Mapping[str, torch.Tensor], model_keys: set[str], spec: ModelSpec,
               family: Family) -> dict[str, list[str]]:
    """The file's tensors the model does not own, by the reason they are expected; anything
    unexpected, and anything the model misses, is an error that names the keys."""
    features = read_features(state_dict)
    set_aside: dict[str, list[str]] = {}
    unexpected = []
    for key in state_dict:
        if key in model_keys:
            continue
        reason = family.set_aside_reason(key, features)
        if reason is None:
            unexpected.append(key)
        else:
            set_aside.setdefault(reason, []).append(key)
    missing = sorted(model_keys - set(state_dict))
    if missing or unexpected:
        parts = [f"missing: {_list_keys(missing)}"] if missing else []
        if unexpected:
            parts.append(f"unexpected: {_list_keys(sorted(unexpected))}")
        raise CheckpointError(
            f"the file does not fit the {spec.family!r} model it looks like ({family.description}); " + "; ".join(parts)
        )
    return set_aside


def load_state_dict_into_model(
    state_dict: dict[str, torch.Tensor],
    *,
    source: Path | None = None,
    family: str | None = None,
    prediction: str | None = None,
    spec: ModelSpec | None = None,
    use_ema: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    unet_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """:func:`load_checkpoint` for a state dict already in memory (``spec`` skips shape derivation)."""
    target_dtype = resolve_dtype(dtype)
    file_dtypes = _dtype_counts(state_dict)
    spec, found = resolve_spec(state_dict, family=family, prediction=prediction, spec=spec)
    model = build_on_meta(spec)
    model_keys = set(model.state_dict())
    set_aside = _set_aside(state_dict, model_keys, spec, found)


    ema_tensors = [k for k in state_dict if k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING]
    decay = state_dict.get("model_ema.decay")
    updates = state_dict.get("model_ema.num_updates")
    ema = EMAInfo(
        present=bool(ema_tensors), used=use_ema,
        decay=float(decay.item()) if decay is not None else None,
        num_updates=int(updates.item()) if updates is not None else None,
        tensors=len(ema_tensors),
    )
    if use_ema:
        if not ema_tensors:
            raise CheckpointError(f"use_ema=True, but {source or 'the checkpoint'} holds no EMA weights")
        _apply_ema(state_dict, [k for k in model_keys if k.startswith(UNET_PREFIX)])

    try:
        training_schedule = read_training_schedule({k: state_dict[k] for k in ("betas", "alphas_cumprod") if k in state_dict})
    except ValueError as error:
        raise CheckpointError(f"{source or 'checkpoint'}: {error}") from None
    if training_schedule is not None and training_schedule.config is not None:
        spec = dataclasses.replace(spec, schedule=training_schedule.config)
    low_scale = read_training_schedule(
        {k[len("low_scale_model."):]: v for k, v in state_dict.items() if k.startswith("low_scale_model.")}
    )
    if low_scale is not None and low_scale.config is not None and spec.noise_augmentation is not None:
        spec = dataclasses.replace(spec, noise_augmentation=low_scale.config)
    if "scale_factor" in state_dict:
        spec = dataclasses.replace(spec, scale_factor=float(state_dict["scale_factor"].item()))
    model.spec = spec

    weights = {k: state_dict[k] for k in model_keys}
    del state_dict  # the set-aside tensors may go now
    _convert_dtype(weights, target_dtype)
    _convert_dtype(weights, unet_dtype, prefix=UNET_PREFIX)
    assign_weights(model, weights, spec.family)
    if torch.device(device).type != "cpu":
        model.to(device)
    return LoadedModel(
        model=model, spec=spec, family=found, source=source,
        training_schedule=training_schedule, ema=ema, dtype=target_dtype, file_dtypes=file_dtypes,
        set_aside=set_aside,
    )


def resolve_spec(state_dict: Mapping[str, Any], *, family: str | None = None, prediction: str | None = None,
                 spec: ModelSpec | None = None) -> tuple[ModelSpec, Family]:
    """The spec to build and its family: ``spec`` as given (a YAML or our own metadata described the
    file, so an architecture no preset has is fine), else detected from the keys and shapes."""
    if spec is None:
        found = detect(state_dict, family).with_prediction(prediction)
        return found.derive_spec(shapes_of(state_dict), prediction), found
    if prediction is not None:
        spec = dataclasses.replace(spec, prediction=prediction)
    return spec, get_family(spec.family)


def described_spec(state_dict: Mapping[str, Any], *, path: Path | None, family: str | None = None,
                   config_yaml: str | os.PathLike | Mapping[str, Any] | None = None) -> ModelSpec | None:
    """The spec a CompVis YAML or the file's own metadata states, or None (then keys tell)."""
    from latent_diffusion.checkpoints.yaml_config import spec_from_yaml

    if config_yaml is not None:
        spec = spec_from_yaml(config_yaml, family=family or _detected_family_or_none(state_dict))
        return _with_recorded_vocabulary(spec, path)
    if family is None and path is not None:
        return _spec_from_metadata(path)
    return None


def _with_recorded_vocabulary(spec: ModelSpec, path: Path | None) -> ModelSpec:
    """``spec`` with the words its text encoder was trained on, which a CompVis YAML cannot state but
    the header of a file of ours does."""
    from latent_diffusion.config import BERTTextConfig

    if path is None or not isinstance(spec.conditioner, BERTTextConfig):
        return spec
    header = _spec_from_metadata(path)
    if header is None or not isinstance(header.conditioner, BERTTextConfig) or header.conditioner.vocabulary is None:
        return spec
    return dataclasses.replace(spec, conditioner=dataclasses.replace(spec.conditioner,
                                                                     vocabulary=header.conditioner.vocabulary))


def _detected_family_or_none(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    try:
        return detect(state_dict).name
    except CheckpointError:
        return None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    prediction: str | None = None,
    config_yaml: str | os.PathLike | Mapping[str, Any] | None = None,
    use_ema: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    unet_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a CompVis / Stable Diffusion single file (``.safetensors``, ``.ckpt``...) strictly.

    ``family`` forces a registry entry instead of detecting it; ``prediction`` ("eps", "v", "x0")
    settles what keys cannot show (SD 2 512-eps vs 768-v); ``config_yaml`` (a CompVis-style
    inference YAML) replaces the derived configuration entirely. ``use_ema`` loads the stored EMA
    weights into the UNet. ``dtype``: None -> float32; a floating dtype -> that; "keep" -> as stored.
    ``unet_dtype`` overrides it for the UNet (bf16 mode), converted tensor by tensor as it loads.
    """
    path = Path(path)
    state_dict = read_state_dict(path)
    with errors_name_file(path):
        spec = described_spec(state_dict, path=path, family=family, config_yaml=config_yaml)
        return load_state_dict_into_model(
            state_dict, source=path, family=family, prediction=prediction, spec=spec,
            use_ema=use_ema, dtype=dtype, device=device, unet_dtype=unet_dtype,
        )


@contextlib.contextmanager
def errors_name_file(path: Path):
    """Prefix ``path`` to the CheckpointErrors raised inside (detection and fitting speak of keys only)."""
    try:
        yield
    except CheckpointError as error:
        if str(path) in str(error):
            raise
        raise CheckpointError(f"{path}: {error}") from None


SPEC_METADATA_KEY = "latent_diffusion.spec"


def _spec_from_metadata(path: Path) -> ModelSpec | None:
    """The exact spec our own training stores in a .safetensors header, when present.

    Small models of ours (the built-in one among them) have sizes that no preset has, and head
    counts cannot be read from tensor shapes, so the file says what it is.
    """
    from latent_diffusion.checkpoints.io import read_safetensors_metadata, sniff_format
    from latent_diffusion.config import spec_from_dict

    if sniff_format(path) != "safetensors":
        return None
    text = read_safetensors_metadata(path).get(SPEC_METADATA_KEY)
    if text is None:
        return None
    try:
        return spec_from_dict(json.loads(text))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: the stored model spec ({SPEC_METADATA_KEY}) is unreadable: {error}") from None


def describe_checkpoint(path: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """See :func:`latent_diffusion.checkpoints.describe.describe_checkpoint` (re-exported here for the CLI)."""
    from latent_diffusion.checkpoints.describe import describe_checkpoint as describe

    return describe(path, **overrides)


def format_description(description: dict[str, Any]) -> str:
    """See :func:`latent_diffusion.checkpoints.describe.format_description`."""
    from latent_diffusion.checkpoints.describe import format_description as format_lines

    return format_lines(description)
