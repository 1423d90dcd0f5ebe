"""Building a stage-2 model for training, conditioning it, and writing it as a CompVis single file.

The saved file has the original layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``, ``model_ema.*``, ``scale_factor``, ``betas``, ``alphas_cumprod``) plus a
CompVis-format YAML next to it, so ``checkpoints.load.load_checkpoint(path, config_yaml=...)``
and other tools read it; the safetensors metadata also holds the spec as JSON.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from latent_diffusion.config import (
    AutoencoderConfig, BERTTextConfig, ClassEmbedderConfig, CLIPTextConfig, ConfigError, ModelSpec,
)
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
from latent_diffusion.models.ldm import LatentDiffusion
from latent_diffusion.models.tokenizer import CLIPTokenizer
from latent_diffusion.training.config import ExperimentConfig, LDMSettings, to_plain

from latent_diffusion.checkpoints.load import SPEC_METADATA_KEY  # noqa: E402  (one name for writer and reader)
CLIP_VOCAB_SIZE = 49408
_CONDITIONING_FOR_TASK = {"txt2img": "crossattn", "class": "crossattn", "unconditional": "none",
                          "superres": "concat", "inpainting": "concat"}


def load_first_stage(path: str) -> AutoencoderKL | VQModel:
    """A stage-1 result of ours, or the first stage of a single-file LDM / SD checkpoint."""
    from latent_diffusion.checkpoints.io import read_safetensors_metadata, read_state_dict, sniff_format
    from latent_diffusion.training.autoencoder import AUTOENCODER_METADATA_KEY

    if not Path(path).is_file():
        raise ConfigError(f"ldm.first_stage: {path} is not a file")
    metadata = read_safetensors_metadata(path) if sniff_format(path) == "safetensors" else {}
    if AUTOENCODER_METADATA_KEY in metadata:
        from latent_diffusion.config import from_mapping

        config = from_mapping(AutoencoderConfig, json.loads(metadata[AUTOENCODER_METADATA_KEY]))
        model = AutoencoderKL(config) if config.kind == "kl" else VQModel(config)
        model.load_state_dict(read_state_dict(path), strict=True)
        return model
    from latent_diffusion.checkpoints.load import load_checkpoint

    return load_checkpoint(path).model.first_stage_model


def conditioner_config(settings: LDMSettings) -> tuple[object, nn.Module | None]:
    """(condition encoder config, a frozen pre-trained encoder module or None)."""
    cond = settings.conditioner
    if settings.task in ("unconditional", "superres", "inpainting"):
        return None, None
    if cond.kind == "text":
        return BERTTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_seq_len=cond.max_seq_len, n_embed=cond.n_embed,
                              n_layer=cond.n_layer), None
    if cond.kind == "class":
        # One extra label is the "no class" token that condition dropout uses (CompVis ucg for ClassEmbedder).
        return ClassEmbedderConfig(n_classes=cond.n_classes + 1, embed_dim=settings.unet.context_dim or 512), None
    if cond.kind == "clip":
        if not cond.checkpoint:
            raise ConfigError("ldm.conditioner.checkpoint: a frozen CLIP encoder is read from an SD single file")
        from latent_diffusion.checkpoints.load import load_checkpoint

        loaded = load_checkpoint(cond.checkpoint)
        if not isinstance(loaded.spec.conditioner, CLIPTextConfig):
            raise ConfigError(f"ldm.conditioner.checkpoint: {cond.checkpoint} has no CLIP text encoder")
        return loaded.spec.conditioner, loaded.model.cond_stage_model
    raise ConfigError(f"ldm.conditioner.kind={cond.kind!r} does not fit ldm.task={settings.task!r}")


def build_training_model(config: ExperimentConfig) -> tuple[LatentDiffusion, bool]:
    """The model to train and whether its condition encoder is trained too (the from-scratch text transformer)."""
    settings = config.ldm
    if settings.init_checkpoint:
        from latent_diffusion.checkpoints.load import load_checkpoint

        loaded = load_checkpoint(settings.init_checkpoint, config_yaml=settings.init_config)
        model, spec = loaded.model, loaded.spec
        spec = dataclasses.replace(spec, prediction=settings.prediction) if settings.prediction != spec.prediction else spec
        if settings.scale_factor is not None:
            spec = dataclasses.replace(spec, scale_factor=settings.scale_factor)
        model.spec = spec
        return model, False
    first_stage = load_first_stage(settings.first_stage)
    conditioner, frozen_encoder = conditioner_config(settings)
    unet = settings.unet
    latent = first_stage.config.embed_dim
    expected_in = latent + {"superres": 3, "inpainting": latent + 1}.get(settings.task, 0)
    if unet.in_channels != expected_in or unet.out_channels != latent:
        raise ConfigError(
            f"ldm.unet: task {settings.task!r} with {latent} latent channels needs in_channels={expected_in} "
            f"and out_channels={latent}; got {unet.in_channels} and {unet.out_channels}"
        )
    width = getattr(conditioner, "n_embed", None) or getattr(conditioner, "embed_dim", None) or getattr(conditioner, "width", None)
    if conditioner is not None and unet.context_dim != width:
        raise ConfigError(f"ldm.unet.context_dim must equal the condition encoder's width {width}; got {unet.context_dim}")
    if conditioner is None and unet.context_dim is not None and unet.use_spatial_transformer:
        raise ConfigError("ldm.unet: an unconditional / image-conditioned UNet takes no context (context_dim: null)")
    spec = ModelSpec(
        family="custom", unet=unet, autoencoder=first_stage.config, conditioner=conditioner,
        conditioning=_CONDITIONING_FOR_TASK[settings.task], prediction=settings.prediction,
        schedule=settings.schedule, scale_factor=settings.scale_factor or 1.0,
    )
    model = LatentDiffusion(spec)
    model.first_stage_model.load_state_dict(first_stage.state_dict(), strict=True)
    if frozen_encoder is not None:
        model.cond_stage_model.load_state_dict(frozen_encoder.state_dict(), strict=True)
    if settings.conditioner.init:
        _load_text_encoder(model.cond_stage_model, settings.conditioner.init)
    return model, settings.conditioner.kind in ("text", "class") and settings.conditioner.lr_scale > 0


def _load_text_encoder(encoder: nn.Module, path: str) -> None:
    """Start the from-scratch text encoder from ``path`` (its own state dict), naming any mismatch."""
    from latent_diffusion.checkpoints.io import CheckpointError, read_state_dict
    from latent_diffusion.checkpoints.load import check_weights_fit

    if not Path(path).is_file():
        raise ConfigError(f"ldm.conditioner.init: {path} is not a file")
    tensors = read_state_dict(path)
    try:
        check_weights_fit(tensors, encoder.state_dict(), "text encoder ldm.conditioner describes")
    except CheckpointError as error:
        raise ConfigError(f"ldm.conditioner.init: {path}: {error}") from None
    encoder.load_state_dict(tensors, strict=True)  # copies into the module's own dtype


def make_tokenizer(spec: ModelSpec) -> CLIPTokenizer | None:
    """The tokenizer of the model's (first) text encoder, as its family says; None without text."""
    from latent_diffusion.families import family_of

    family = family_of(spec)
    return family.tokenizers(spec)[0] if family.takes_text(spec) else None


class ConditionedUNet(nn.Module):
    """UNet plus the condition encoder when it trains with it: the one module DDP wraps and EMA averages."""

    def __init__(self, unet: nn.Module, encoder: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if self.encoder is not None and condition is not None:
            context = self.encoder(condition)
        return self.unet(x, t, context=context)


def random_masks(generators: list[torch.Generator], size: int) -> torch.Tensor:
    """One random rectangle (1 = to inpaint) per image, as in the LDM inpainting training."""
    masks = torch.zeros(len(generators), 1, size, size)
    for i, g in enumerate(generators):
        h, w = (torch.randint(size // 4, size * 3 // 4 + 1, (2,), generator=g)).tolist()
        top, left = torch.randint(0, size - h + 1, (1,), generator=g).item(), torch.randint(0, size - w + 1, (1,), generator=g).item()
        masks[i, :, top : top + h, left : left + w] = 1
    return masks


def concat_condition(task: str, images: torch.Tensor, masks: torch.Tensor | None, latent_size: tuple[int, int],
                     encode) -> torch.Tensor | None:
    """Image channels concatenated to the latent: the low-res image (super-resolution) or mask + masked-image latent."""
    if task == "superres":
        return F.interpolate(images, size=latent_size, mode="bicubic", align_corners=False, antialias=True)
    if task == "inpainting":
        masked_latent = encode(images * (1 - masks))
        return torch.cat([F.interpolate(masks, size=latent_size, mode="nearest"), masked_latent], dim=1)
    return None


def _compvis_yaml(spec: ModelSpec) -> dict:
    unet = {k: v for k, v in to_plain(spec.unet).items()}
    ae = to_plain(spec.autoencoder)
    kind = ae.pop("kind")
    top = {"embed_dim": ae.pop("embed_dim")}
    if kind == "vq":
        top["n_embed"] = ae.pop("n_embed")
    else:
        ae.pop("n_embed")
    ae = {k: ae[k] for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                             "num_res_blocks", "attn_resolutions", "dropout", "attn_type")}
    conditioner = spec.conditioner
    if conditioner is None:
        cond = "__is_unconditional__"
    elif isinstance(conditioner, BERTTextConfig):
        cond = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
                "params": {"n_embed": conditioner.n_embed, "n_layer": conditioner.n_layer,
                           "vocab_size": conditioner.vocab_size, "max_seq_len": conditioner.max_seq_len}}
    elif isinstance(conditioner, ClassEmbedderConfig):
        cond = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": conditioner.n_classes, "embed_dim": conditioner.embed_dim}}
    elif conditioner.layout == "openai":
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"max_length": conditioner.context_length}}
    else:
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"layer": "penultimate" if conditioner.skip_last_layers else "last"}}
    beta_schedule = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}[spec.schedule.kind]
    params = {
        "linear_start": spec.schedule.linear_start, "linear_end": spec.schedule.linear_end,
        "timesteps": spec.schedule.timesteps, "beta_schedule": beta_schedule, "parameterization": spec.prediction,
        "scale_factor": spec.scale_factor,
        "conditioning_key": None if spec.conditioning == "none" else spec.conditioning,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": f"ldm.models.autoencoder.{'AutoencoderKL' if kind == 'kl' else 'VQModelInterface'}",
                               "params": {**top, "ddconfig": ae, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond,
    }
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def export_single_file(model: LatentDiffusion, ema_shadow: dict[str, torch.Tensor] | None, ema_info: tuple[float, int],
                       path: Path, carry_from: str | None = None) -> Path:
    """Write ``path`` (.safetensors, original key layout) and its CompVis YAML ``path.with_suffix('.yaml')``.

    ``carry_from`` (the checkpoint a fine-tune started from): its keys that the model does not hold
    (CompVis schedule buffers, CLIP position ids) are copied unchanged, so the result has the key
    set of the file it came from; its EMA weights are not, as they average the old weights.
    """
    from latent_diffusion.checkpoints.io import save_safetensors
    from latent_diffusion.checkpoints.load import ema_key
    from latent_diffusion.diffusion.schedules import alphas_cumprod_for

    spec = model.spec
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema_shadow:
        for name, value in ema_shadow.items():
            if name.startswith("unet."):
                tensors[ema_key("model.diffusion_model." + name[len("unet."):])] = value.detach().cpu().float()
        tensors["model_ema.decay"] = torch.tensor(ema_info[0], dtype=torch.float32)
        tensors["model_ema.num_updates"] = torch.tensor(ema_info[1], dtype=torch.int32)
    alphas_cumprod = alphas_cumprod_for(spec.schedule).to(torch.float64)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    tensors["betas"] = (1 - alphas_cumprod / previous).float()
    tensors["alphas_cumprod"] = alphas_cumprod.float()
    tensors["scale_factor"] = torch.tensor(spec.scale_factor, dtype=torch.float32)
    if carry_from is not None:
        from latent_diffusion.checkpoints.io import read_state_dict

        for key, value in read_state_dict(carry_from).items():
            if key not in tensors and not key.startswith("model_ema."):
                tensors[key] = value.detach().cpu().contiguous()
    save_safetensors(tensors, path, {SPEC_METADATA_KEY: json.dumps(to_plain(spec)), "format": "pt"})
    compvis = _compvis_yaml(spec)
    if _yaml_describes(compvis, spec):
        path.with_suffix(".yaml").write_text(yaml.safe_dump(compvis, sort_keys=False))
    else:
        # A CompVis YAML cannot state every size (e.g. a CLIP tower narrower than ViT-L); a YAML
        # beside the file would override the exact spec in the header, so none is written.
        path.with_suffix(".yaml").unlink(missing_ok=True)
    return path


def _yaml_describes(compvis: dict, spec: ModelSpec) -> bool:
    """Whether reading ``compvis`` back gives the networks, conditioning and objective of ``spec``."""
    from latent_diffusion.checkpoints.yaml_config import spec_from_yaml

    try:
        read = spec_from_yaml(compvis, family=spec.family)
    except (ValueError, TypeError, KeyError):
        return False
    fields = ("unet", "autoencoder", "conditioning", "prediction", "schedule")
    return all(getattr(read, name) == getattr(spec, name) for name in fields) and read.conditioner == _unworded(spec.conditioner)


def _unworded(conditioner):
    """The conditioner without its training vocabulary, which a YAML cannot state (loading reads it
    from the file's header)."""
    if isinstance(conditioner, BERTTextConfig):
        return dataclasses.replace(conditioner, vocabulary=None)
    return conditioner
