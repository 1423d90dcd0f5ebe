"""ControlNet files as users have them, loaded strictly into a :class:`ControlNet`.

Three layouts are read:

- the original release (``control_v11p_sd15_canny.pth`` / ``.safetensors``): ``control_model.*``
  keys, or the same keys without the prefix; ControlNet 1.0 files also carry the base model they
  were trained with, which is set aside. A CompVis YAML of the same name may say
  ``global_average_pooling`` (the shuffle ControlNet), which no tensor shows.
- "difference" ControlNets (a ``difference`` key): the encoder copy is stored as its difference to
  the base UNet, so they load only beside a model, whose UNet weights are added.
- diffusers folders (``config.json`` of a ``ControlNetModel`` and its weights), and single files in
  diffusers' names, as SDXL ControlNets are often shared (``controlnet_diffusers.py``).

The sizes come from the tensor shapes (or the folder's config); the head layout, which no shape
shows, from the family the text width names (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048 with the ADM
vector). Our own ControlNets state their config in the file's metadata.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from latent_diffusion import config as presets
from latent_diffusion.checkpoints.io import CheckpointError, read_safetensors_metadata, read_state_dict, sniff_format
from latent_diffusion.checkpoints.load import _convert_dtype, _dtype_counts, _SkipInitialisation, check_weights_fit
from latent_diffusion.config import ConfigError, ModelSpec, UNetConfig, from_mapping, spec_to_dict
from latent_diffusion.models.controlnet import ControlNet, ControlNetConfig

CONTROL_PREFIX = "control_model."
HINT_KEY = "input_hint_block.0.weight"
DIFFERENCE_KEY = "difference"
METADATA_KEY = "latent_diffusion.controlnet"
# What ControlNet 1.0 files carry beside the ControlNet: the model it was trained with.
_BASE_MODEL_PREFIXES = ("model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.")
_ENCODER_COPY = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
_FAMILY_WORDS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@dataclass
class LoadedControlNet:
    """A loaded ControlNet with what its file told us."""

    model: ControlNet
    config: ControlNetConfig
    family: str | None  # "sd1", "sd2", "sdxl"; None: an architecture no released family has
    source: Path
    layout: str  # "original", "difference" or "diffusers"
    hash: str
    set_aside: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name

    @property
    def title(self) -> str:
        """How A1111's ControlNet extension lists a model: ``name [hash]``."""
        return f"{self.name} [{self.hash}]"

    @property
    def family_words(self) -> str:
        return controlnet_family_words(self.family, self.config.unet)


# ---------------------------------------------------------------------------------------------- recognising
def controlnet_layout(keys) -> str | None:
    """"original" (with or without ``control_model.``), "difference", "diffusers" or None (not a ControlNet)."""
    keys = set(keys)
    if DIFFERENCE_KEY in keys and CONTROL_PREFIX + HINT_KEY in keys:
        return "difference"
    if CONTROL_PREFIX + HINT_KEY in keys or HINT_KEY in keys:
        return "original"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers"
    return None


def is_controlnet(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ControlNet file or a diffusers ControlNet folder (read from keys, not names)."""
    from latent_diffusion.checkpoints.io import read_tensor_infos

    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and '"ControlNetModel"' in config.read_text(errors="replace")
    return controlnet_layout(read_tensor_infos(path)) is not None


def controlnet_family(unet: UNetConfig) -> str | None:
    """The released family a ControlNet's encoder belongs to, told by its text width and ADM input."""
    if unet.num_classes == "sequential":
        return "sdxl" if unet.context_dim == presets.SDXL.unet.context_dim else None
    return {presets.SD1.unet.context_dim: "sd1", presets.SD2.unet.context_dim: "sd2"}.get(unet.context_dim)


def controlnet_family_words(family: str | None, unet: UNetConfig) -> str:
    if family is not None:
        return f"{_FAMILY_WORDS[family]} ControlNet"
    return f"ControlNet for {unet.context_dim}-wide text" if unet.context_dim else "ControlNet"


def head_layout(adm: bool, linear: bool) -> UNetConfig:
    """The preset UNet whose head layout a ControlNet's encoder has (files cannot state it)."""
    if adm:
        return presets.SDXL.unet
    return presets.SD2.unet if linear else presets.SD1.unet


# ---------------------------------------------------------------------------------------------- configs
def _hint_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Hint channels and widths from ``input_hint_block.N.weight`` (N = 0, 2, 4, ...: SiLUs between)."""
    indices = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if indices != list(range(0, 2 * len(indices), 2)) or len(indices) % 2:
        raise CheckpointError(f"the hint encoder's convolutions are numbered {indices}; expected 0, 2, 4, ... "
                              "in pairs (a first one, a same-width and a halving one per level, a last one)")
    first = shapes["input_hint_block.0.weight"]
    # The halving convolution of each level ends a pair: indices 4, 8, 12 ... before the last.
    widths = [first[0]] + [shapes[f"input_hint_block.{i}.weight"][0] for i in indices[2:-1:2]]
    return {"hint_channels": first[1], "hint_widths": tuple(widths)}


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> ControlNetConfig:
    """A ControlNet's config from its (unprefixed, original-layout) tensor shapes."""
    from latent_diffusion.families.derive import derive_unet_encoder_config

    try:
        linear = len(next(v for k, v in shapes.items() if k.endswith(".proj_in.weight"))) == 2
    except StopIteration:
        linear = False
    base = head_layout("label_emb.0.0.weight" in shapes, linear)
    try:
        unet = derive_unet_encoder_config(shapes, base, "")
        return ControlNetConfig(unet, **_hint_config(shapes))
    except (KeyError, IndexError, ZeroDivisionError, ConfigError) as error:
        raise CheckpointError(f"a ControlNet, but a tensor its architecture needs is missing or malformed: {error}") from None


def _config_from_metadata(path: Path) -> ControlNetConfig | None:
    """The exact config our own training stores in a .safetensors header, when present."""
    if path.is_dir() or sniff_format(path) != "safetensors":
        return None
    text = read_safetensors_metadata(path).get(METADATA_KEY)
    if text is None:
        return None
    try:
        values = dict(json.loads(text))
        values["unet"] = from_mapping(UNetConfig, values["unet"])
        return from_mapping(ControlNetConfig, values)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path}: the stored ControlNet config ({METADATA_KEY}) is unreadable: {error}") from None


def _yaml_options(path: Path) -> dict[str, Any]:
    """What a CompVis YAML beside the file says that no tensor shows (the shuffle ControlNet's pooling)."""
    import yaml

    for candidate in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if candidate.is_file():
            try:
                document = yaml.safe_load(candidate.read_text())
                params = document["model"]["params"]["control_stage_config"]["params"]
            except (yaml.YAMLError, KeyError, TypeError) as error:
                raise CheckpointError(f"{candidate}: not a ControlNet YAML (model.params.control_stage_config."
                                      f"params unreadable: {error})") from None
            return {"global_average_pooling": bool(params.get("global_average_pooling", False))}
    return {}


# ---------------------------------------------------------------------------------------------- weights
def _original_weights(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The ControlNet's tensors without their prefix, and what was set aside (by reason)."""
    prefixed = any(k.startswith(CONTROL_PREFIX) for k in state)
    weights: dict[str, torch.Tensor] = {}
    set_aside: dict[str, list[str]] = {}
    for key, tensor in state.items():
        if prefixed and key.startswith(CONTROL_PREFIX):
            weights[key[len(CONTROL_PREFIX):]] = tensor
        elif key == DIFFERENCE_KEY:
            set_aside.setdefault("marks a difference to the base model", []).append(key)
        elif prefixed and key.startswith(_BASE_MODEL_PREFIXES):
            set_aside.setdefault("the base model the ControlNet was trained with", []).append(key)
        elif prefixed:
            raise CheckpointError(f"{path}: a ControlNet with a tensor that is neither the ControlNet's "
                                  f"(control_model.*) nor its base model's: {key!r}")
        else:
            weights[key] = tensor
    return weights, set_aside


def _add_base(weights: dict[str, torch.Tensor], path: Path,
              base_unet: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A difference ControlNet's encoder copy: its stored differences plus the base UNet's weights."""
    if base_unet is None:
        raise CheckpointError(f"{path}: a difference ControlNet stores its weights relative to a base model; "
                              "load it beside one (it is used with a model, not alone)")
    out = dict(weights)
    for key, tensor in weights.items():
        if key.startswith(_ENCODER_COPY):
            base = base_unet.get(key)
            if base is None or base.shape != tensor.shape:
                raise CheckpointError(f"{path}: the difference for {key!r} has no counterpart of shape "
                                      f"{tuple(tensor.shape)} in the base model's UNet: another family's ControlNet")
            out[key] = tensor.float() + base.float()
    return out


def build_on_meta(config: ControlNetConfig) -> ControlNet:
    with torch.device("meta"), _SkipInitialisation():
        return ControlNet(config)


def short_hash(path: Path) -> str:
    """A1111's short model hash of ControlNet files: SHA-256 of 64 KiB from 1 MiB into the file, 8 digits."""
    if path.is_dir():
        path = next(iter(sorted(path.glob("diffusion_pytorch_model*"))), path / "config.json")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]


# ---------------------------------------------------------------------------------------------- loading
def read_controlnet(path: str | os.PathLike) -> tuple[ControlNetConfig, dict[str, torch.Tensor], str, dict[str, list[str]]]:
    """(config, original-layout weights, layout, set-aside keys) of a ControlNet file or folder; a
    difference ControlNet's encoder copy is still the difference."""
    from latent_diffusion.checkpoints.controlnet_diffusers import diffusers_file, diffusers_folder

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet not found: {path}")
    if path.is_dir():
        config, weights = diffusers_folder(path)
        return config, weights, "diffusers", {}
    state = read_state_dict(path)
    layout = controlnet_layout(state)
    if layout is None:
        shown = ", ".join(sorted(state)[:3])
        raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block; keys start {shown})")
    if layout == "diffusers":
        config, weights = diffusers_file(path, state)
        return config, weights, "diffusers", {}
    weights, set_aside = _original_weights(state, path)
    stated = _config_from_metadata(path)
    config = stated or config_from_shapes({k: tuple(v.shape) for k, v in weights.items()})
    config = dataclasses.replace(config, **_yaml_options(path))
    return config, weights, layout, set_aside


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu",
                    base_unet: Mapping[str, torch.Tensor] | None = None) -> LoadedControlNet:
    """Load a ControlNet strictly (every tensor placed, none missing); ``base_unet``: the state dict of
    the UNet a difference ControlNet is relative to. ``dtype`` None keeps the file's."""
    path = Path(path)
    config, weights, layout, set_aside = read_controlnet(path)
    if layout == "difference":
        weights = _add_base(weights, path, base_unet)
    model = build_on_meta(config)
    try:
        check_weights_fit(weights, model.state_dict(), f"ControlNet its shapes describe ({path})")
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    _convert_dtype(weights, dtype)
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if torch.device(device).type != "cpu":
        model.to(device)
    return LoadedControlNet(model, config, controlnet_family(config.unet), path, layout, short_hash(path), set_aside)


def check_controlnet_fits(controlnet: LoadedControlNet, spec: ModelSpec, model_name: str) -> None:
    """ValueError unless the ControlNet's residuals fit the model's UNet and it takes the model's inputs."""
    mine, theirs = controlnet.config.unet, spec.unet
    fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels", "dims")
    differ = [name for name in fields if getattr(mine, name) != getattr(theirs, name)]
    if mine.in_channels != spec.latent_channels:
        differ.append("in_channels")
    if differ:
        theirs_words = _FAMILY_WORDS.get(controlnet_family(theirs) or "", spec.family)
        raise ValueError(
            f"ControlNet {controlnet.name!r} is an {controlnet.family_words} and does not fit {model_name!r}, a "
            f"{spec.family!r} model ({theirs_words}): they differ in {', '.join(differ)}; use a ControlNet made "
            "for this model's family")


# ---------------------------------------------------------------------------------------------- describing
def describe_controlnet(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready summary of a ControlNet file or folder, for ``ldm info`` (the weights are not loaded:
    a difference ControlNet's shapes are its base's)."""
    path = Path(path)
    config, weights, layout, set_aside = read_controlnet(path)
    family = controlnet_family(config.unet)
    return {
        "file": str(path), "kind": "controlnet", "layout": layout,
        "family": family, "description": controlnet_family_words(family, config.unet),
        "parameters": sum(t.numel() for t in weights.values()),
        "dtypes": _dtype_counts(weights), "hint_channels": config.hint_channels,
        "hint_factor": config.hint_factor, "global_average_pooling": config.global_average_pooling,
        "config": spec_to_dict(config),
        "set_aside": {reason: len(keys) for reason, keys in set_aside.items()},
        "hash": short_hash(path),
    }


def save_controlnet(model: ControlNet, path: str | os.PathLike) -> Path:
    """Write ``model`` in the original layout (``control_model.*``), its exact config in the metadata."""
    from latent_diffusion.checkpoints.io import save_safetensors

    tensors = {CONTROL_PREFIX + key: tensor for key, tensor in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(spec_to_dict(model.control_config))}
    save_safetensors(tensors, path, metadata)
    return Path(path)


def format_controlnet_description(d: dict[str, Any]) -> str:
    """Human-readable lines for :func:`describe_controlnet` (``ldm info``)."""
    unet = d["config"]["unet"]
    kinds = ", ".join(f"{k} x{n}" for k, n in d["dtypes"].items())
    lines = [
        f"file:        {d['file']} [{d['hash']}]",
        f"kind:        {d['description']} ({d['layout']} layout)" + (
            "" if d["family"] else "; no released family has its architecture"),
        f"family:      {d['family'] or 'none'}",
        f"parameters:  {d['parameters'] / 1e6:,.1f} M   [{kinds}]",
        f"encoder:     {unet['model_channels']} channels x {tuple(unet['channel_mult'])}, "
        f"{unet['num_res_blocks']} blocks per level, text width {unet['context_dim']}",
        f"control image: {d['hint_channels']} channels, {d['hint_factor']}x the latent's size"
        + (", pooled over the image (shuffle)" if d["global_average_pooling"] else ""),
    ]
    lines += [f"set aside:   {count} tensors ({reason})" for reason, count in d["set_aside"].items()]
    if d["layout"] == "difference":
        lines.append("note:        stored as a difference to its base model; loads beside a model of its family")
    return "\n".join(lines)
