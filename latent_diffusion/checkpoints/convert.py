"""Conversion between the original single-file layout and the diffusers folder layout, at the edge.

A diffusers folder is::

    model_index.json  scheduler/scheduler_config.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}       (a transformers CLIPTextModel)
    text_encoder_2/{config.json, model.safetensors}     (SDXL: CLIPTextModelWithProjection)

Which text encoders a model has, and under which names, its family says
(``Family.components``). Tensors are only renamed (``diffusers_names.py``), except where diffusers
stores a different shape: the VAE attention's 1x1 convolutions become linear layers, OpenCLIP's
fused q/k/v projection is split in three, and bigG's projection is a transposed linear layer.

diffusers drops what a model never uses from an OpenCLIP text tower (SD 2's last layer,
``text_projection``, ``logit_scale``). We keep those in ``<text encoder>/openclip_extras.safetensors``
(ignored by diffusers and transformers) so our own round trip loses nothing; folders made by
diffusers lack them, and then the unused tensors are filled with NaN, so that any use shows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.checkpoints import diffusers_configs as configs
from latent_diffusion.checkpoints.diffusers_names import (
    EXTRAS_ONLY, openai_clip_name, openclip_name, unet_name, vae_name,
)
from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict, save_safetensors
from latent_diffusion.checkpoints.load import LoadedModel, build_on_meta, load_state_dict_into_model
from latent_diffusion.config import CLIPTextConfig, ModelSpec
from latent_diffusion.families import FAMILIES, Family, detect, family_of, shapes_of
from latent_diffusion.families.base import Component

_OPENCLIP_EXTRAS = "openclip_extras.safetensors"


def _extras(component: str) -> str:
    """The key of a text encoder's extras in the component dict (its own file in the folder)."""
    return f"{component}/{_OPENCLIP_EXTRAS}"


def _text_components(spec: ModelSpec) -> list[Component]:
    return [part for part in family_of(spec).components(spec) if part.name.startswith("text_encoder")]


# ---------------------------------------------------------------------------------------------
# Tensors


def component_names(spec: ModelSpec, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Original key -> (component folder, diffusers name) for every network key of ``spec`` among ``keys``."""
    blocks_per_level = spec.unet.num_res_blocks + 1
    levels = len(spec.autoencoder.ch_mult)
    parts = family_of(spec).components(spec)
    names: dict[str, tuple[str, str]] = {}
    for key in keys:
        part = next((p for p in parts if key.startswith(p.prefix)), None)
        if part is None:
            continue
        rest = key[len(part.prefix):]
        if part.name == "unet":
            names[key] = ("unet", unet_name(rest, blocks_per_level))
        elif part.name == "vae":
            names[key] = ("vae", vae_name(rest, levels))
        elif rest.startswith("transformer."):
            names[key] = (part.name, openai_clip_name(rest))
        else:
            names[key] = (part.name, openclip_name(rest, configs.with_projection(part.config)))
    return names


def _check_supported(spec: ModelSpec) -> None:
    problems = configs.check_unet_fits(spec.unet) + configs.check_vae_fits(spec.autoencoder)
    texts = _text_components(spec)
    if not texts or not all(isinstance(part.config, CLIPTextConfig) for part in texts):
        problems.append("its condition encoder is not CLIP")
    if problems:
        raise CheckpointError(f"the diffusers layout cannot hold a {spec.family!r} model: {'; '.join(problems)}")


def _diffusers_layers(text: CLIPTextConfig) -> int:
    return text.layers if configs.keeps_every_layer(text) else text.layers - text.skip_last_layers


def _to_text_encoder(out: dict, part: Component, key: str, name: str, tensor: torch.Tensor) -> None:
    """Place one original text-encoder tensor in the diffusers text encoder, or beside it."""
    text = part.config
    layer = re.match(r"text_model\.encoder\.layers\.(\d+)\.", name)
    if text.layout == "openclip" and (name == EXTRAS_ONLY or (layer and int(layer.group(1)) >= _diffusers_layers(text))):
        out[_extras(part.name)][key[len(part.prefix):]] = tensor
    elif "{q,k,v}" in name:
        for letter, chunk in zip("qkv", tensor.chunk(3, dim=0)):
            out[part.name][name.replace("{q,k,v}", letter)] = chunk
    elif name == "text_projection.weight":
        out[part.name][name] = tensor.t()  # x @ P (OpenCLIP) is a Linear layer with weight P^T
    else:
        out[part.name][name] = tensor


def to_diffusers(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Original-layout network weights -> {component (or its extras): diffusers-named tensors}."""
    _check_supported(spec)
    names = component_names(spec, list(state_dict))
    texts = {part.name: part for part in _text_components(spec)}
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}}
    for name in texts:
        out[name], out[_extras(name)] = {}, {}
    for key, tensor in state_dict.items():
        if key not in names:
            raise CheckpointError(f"no diffusers place for {key!r}")
        component, name = names[key]
        if component in texts:
            _to_text_encoder(out, texts[component], key, name, tensor)
            continue
        if component == "vae" and ".mid_block.attentions.0." in name and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 convolution -> linear
        out[component][name] = tensor
    return out


def _from_component(tensors: dict[str, torch.Tensor], name: str, expected: torch.Tensor) -> tuple[torch.Tensor | None, list[str]]:
    """The original tensor for diffusers name ``name`` and the diffusers names it used (None: absent)."""
    if "{q,k,v}" in name:
        parts = [name.replace("{q,k,v}", letter) for letter in "qkv"]
        if all(p in tensors for p in parts):
            return torch.cat([tensors[p] for p in parts], dim=0), parts
        return None, []
    if name not in tensors:
        return None, []
    tensor = tensors[name]
    if name == "text_projection.weight":
        tensor = tensor.t()
    elif tensor.dim() == 2 and expected.dim() == 4:
        tensor = tensor[:, :, None, None]  # linear -> 1x1 convolution
    return tensor, [name]


def from_diffusers(spec: ModelSpec, components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers`: diffusers-named tensors -> original-layout network weights."""
    _check_supported(spec)
    expected = build_on_meta(spec).state_dict()
    names = component_names(spec, list(expected))
    prefixes = {part.name: part.prefix for part in _text_components(spec)}
    out: dict[str, torch.Tensor] = {}
    used: dict[str, set[str]] = {c: set() for c in components}
    for key, (component, name) in names.items():
        tensor, taken = _from_component(components[component], name, expected[key])
        if tensor is not None:
            out[key] = tensor
            used[component].update(taken)
            continue
        extras = components.get(_extras(component), {})
        original = key[len(prefixes.get(component, "")):]
        if original in extras:
            out[key] = extras[original]
            used[_extras(component)].add(original)
    for component, tensors in components.items():
        unused = sorted(set(tensors) - used[component])
        if unused:
            raise CheckpointError(f"{component}: tensors with no place in a {spec.family!r} model: {unused[:10]} "
                                  f"({len(unused)} in all)")
    return out


# ---------------------------------------------------------------------------------------------
# Folders


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {path.parent.parent} a diffusers folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def _weights_file(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise CheckpointError(f"{folder}: no weights file ({' / '.join(stems)}.safetensors or .bin)")


def _strip_text_model_level(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; accept both."""
    return {(k if k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale") else f"text_model.{k}"): v
            for k, v in tensors.items()}


def _folder_family(root: Path) -> Family:
    """The family whose preset a folder starts from: the first whose text encoders have the folder's
    names and activations (CLIP-L quick_gelu, OpenCLIP gelu); the UNet's shapes settle variants later."""
    for family in FAMILIES:
        if family.preset is None or family.diffusers_pipeline is None:
            continue
        texts = _text_components(family.preset)
        if {part.name for part in texts} != {p.name for p in root.glob("text_encoder*") if p.is_dir()}:
            continue
        if all(_read_json(root / part.name / "config.json").get("hidden_act") == part.config.activation
               for part in texts):
            return family
    raise CheckpointError(f"{root}: its text encoders fit no family this package loads")


def _read_text_encoders(root: Path, base: ModelSpec, family: Family) -> tuple[dict, dict[str, CLIPTextConfig]]:
    """(component tensors with extras, each text encoder's config) of a folder."""
    tensors, texts = {}, {}
    for part in family.components(base):
        if not part.name.startswith("text_encoder"):
            continue
        folder = root / part.name
        config = _read_json(folder / "config.json")
        tensors[part.name] = _strip_text_model_level(read_state_dict(_weights_file(folder, ("model", "pytorch_model"))))
        extras_path = folder / _OPENCLIP_EXTRAS
        extras = read_state_dict(extras_path) if extras_path.is_file() else {}
        tensors[_extras(part.name)] = extras
        extra_layers = sum(1 for k in extras if re.fullmatch(r"model\.transformer\.resblocks\.\d+\.ln_1\.weight", k))
        texts[part.name] = configs.text_from_config(config, part.config, config["num_hidden_layers"] + extra_layers)
    return tensors, texts


def _with_text_encoders(spec: ModelSpec, texts: dict[str, CLIPTextConfig], unet_config: dict[str, Any]) -> ModelSpec:
    """``spec`` with the text encoder configs read from a folder, in the family's order (and SDXL's
    micro-condition width, which the UNet's config states)."""
    parts = [part.name for part in _text_components(spec)]
    if hasattr(spec.conditioner, "text_encoders"):
        return dataclasses.replace(spec, conditioner=dataclasses.replace(
            spec.conditioner, text_encoders=tuple(texts[name] for name in parts),
            fourier_dim=unet_config.get("addition_time_embed_dim", spec.conditioner.fourier_dim)))
    return dataclasses.replace(spec, conditioner=texts[parts[0]])


def _fill_unused_openclip(spec: ModelSpec, components: dict) -> list[str]:
    """NaN for the OpenCLIP tensors a folder made by diffusers lacks; returns their keys."""
    filled = []
    for part in _text_components(spec):
        text, extras = part.config, components[_extras(part.name)]
        if text.layout != "openclip":
            continue
        unused = [("model.logit_scale", ())]
        if not configs.with_projection(text):
            unused.append(("model.text_projection", (text.width, text.width)))
        for name, shape in unused:
            if name not in extras:
                extras[name] = torch.full(shape, float("nan"))
                filled.append(part.prefix + name)
    return filled


def load_diffusers_folder(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a diffusers Stable Diffusion (1.x, 2.x, XL) folder into our layout."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder")
    unet_config = _read_json(root / "unet" / "config.json")
    vae_config = _read_json(root / "vae" / "config.json")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    base_family = _folder_family(root)
    base = base_family.spec_for()
    components, texts = _read_text_encoders(root, base, base_family)
    components["unet"] = read_state_dict(_weights_file(root / "unet", ("diffusion_pytorch_model",)))
    components["vae"] = read_state_dict(_weights_file(root / "vae", ("diffusion_pytorch_model",)))
    provisional = _with_text_encoders(dataclasses.replace(
        base, unet=configs.unet_from_config(unet_config, base.unet),
        autoencoder=configs.vae_from_config(vae_config, base.autoencoder)), texts, unet_config)

    prediction = {v: k for k, v in configs.PREDICTION_NAMES.items()}.get(scheduler.get("prediction_type", "epsilon"), "eps")
    family = detect(shapes_of(build_on_meta(provisional).state_dict())).with_prediction(prediction)
    family_spec = family.spec_for(prediction)
    spec = dataclasses.replace(
        family_spec, unet=provisional.unet, autoencoder=provisional.autoencoder, conditioner=provisional.conditioner,
        prediction=prediction, scale_factor=float(vae_config.get("scaling_factor", family_spec.scale_factor)),
        schedule=configs.schedule_from_config(scheduler, family_spec.schedule),
    )
    filled = _fill_unused_openclip(spec, components)
    state_dict = from_diffusers(spec, components)
    loaded = load_state_dict_into_model(state_dict, source=root, family=spec.family, spec=spec, dtype=dtype, device=device)
    if filled:
        loaded.set_aside["absent from the diffusers folder; filled with NaN (the model never uses them)"] = filled
    return loaded


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


def _model_index(spec: ModelSpec, family: Family) -> dict[str, Any]:
    index = {
        "_class_name": family.diffusers_pipeline or "StableDiffusionPipeline", "_diffusers_version": configs.WRITER_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    for part in _text_components(spec):
        model = "CLIPTextModelWithProjection" if configs.with_projection(part.config) else "CLIPTextModel"
        index[part.name] = ["transformers", model]
        index[part.name.replace("text_encoder", "tokenizer")] = [None, None]
    if spec.unet.num_classes == "sequential":
        # A1111 and we encode an empty negative prompt as zeros for SDXL; the refiner takes a score.
        index.update(force_zeros_for_empty_prompt=True, requires_aesthetics_score="aesthetic_score" in
                     spec.conditioner.micro_conditions)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    if spec.max_noise_level is not None:
        index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], max_noise_level=spec.max_noise_level)
    return index


def save_diffusers_folder(loaded: LoadedModel, path: str | os.PathLike) -> Path:
    """Write ``loaded`` as a diffusers folder (safetensors weights, configs, model_index.json)."""
    root = Path(path)
    spec = loaded.spec
    family = family_of(spec)
    tensors = to_diffusers(spec, loaded.model.state_dict())
    metadata = {"format": "pt"}
    save_safetensors(tensors["unet"], root / "unet" / "diffusion_pytorch_model.safetensors", metadata)
    _write_json(root / "unet" / "config.json", configs.unet_config(spec))
    save_safetensors(tensors["vae"], root / "vae" / "diffusion_pytorch_model.safetensors", metadata)
    _write_json(root / "vae" / "config.json", configs.vae_config(spec))
    for part in _text_components(spec):
        save_safetensors(tensors[part.name], root / part.name / "model.safetensors", metadata)
        _write_json(root / part.name / "config.json", configs.text_config(part.config))
        if tensors[_extras(part.name)]:
            save_safetensors(tensors[_extras(part.name)], root / part.name / _OPENCLIP_EXTRAS, metadata)
    _write_json(root / "scheduler" / "scheduler_config.json", configs.scheduler_config(spec))
    _write_json(root / "model_index.json", _model_index(spec, family))
    return root


def save_single_file(loaded: LoadedModel, path: str | os.PathLike, *, include_schedule: bool = True) -> Path:
    """Write ``loaded`` as an original-layout ``.safetensors`` (atomically), with the schedule buffers."""
    tensors = dict(loaded.model.state_dict())
    if include_schedule and loaded.training_schedule is not None:
        tensors["betas"] = loaded.training_schedule.betas.float()
        tensors["alphas_cumprod"] = loaded.training_schedule.alphas_cumprod.float()
    metadata = {"format": "pt", "ldm.family": loaded.spec.family, "ldm.prediction": loaded.spec.prediction}
    save_safetensors(tensors, path, metadata)
    return Path(path)
