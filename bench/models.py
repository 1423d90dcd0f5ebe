"""Both sides of the benchmark, loaded from the same original-layout ``.safetensors`` file.

Ours: :func:`latent_diffusion.checkpoints.load.load_checkpoint` and :class:`Pipeline`. diffusers':
``StableDiffusionPipeline.from_single_file`` on the same file, given a local folder holding only the
configs (no weights) so that it never reaches for the network.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from latent_diffusion.config import SD1, AutoencoderConfig, ModelSpec

ROOT = Path(__file__).resolve().parent.parent

# Tiny shapes for --quick: the whole harness end to end in seconds (a 4x-downsampling VAE, as in tests).
QUICK_SPEC = dataclasses.replace(
    SD1,
    unet=dataclasses.replace(SD1.unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(1, 2), num_heads=8, context_dim=32),
    autoencoder=AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1),
    conditioner=dataclasses.replace(SD1.conditioner, width=32, layers=2, heads=1),
)


def spec_for(quick: bool, model: str = "sd15") -> ModelSpec:
    if model == "sdxl":
        sys.path.insert(0, str(ROOT / "tests"))
        from pipeline_tiny import TINY_SDXL

        from latent_diffusion.config import SDXL

        return TINY_SDXL if quick else SDXL
    return QUICK_SPEC if quick else SD1


def write_weights(spec: ModelSpec, path: Path, seed: int = 0) -> Path:
    """Random weights of ``spec`` in the original layout, written once (non-trivial scale everywhere).

    SDXL is written in fp16, as it is released (and so that the fp32 model never exists twice)."""
    if spec.family == "sdxl":
        from bench.sdxl_release_file import random_release_state
        from latent_diffusion.checkpoints.io import save_safetensors

        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(random_release_state(spec, seed), path, {"format": "pt"})
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from pipeline_tiny import random_state

    from latent_diffusion.checkpoints.io import save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(random_state(spec, seed), path, {"format": "pt", "ldm.family": spec.family})
    return path


def write_diffusers_configs(spec: ModelSpec, folder: Path) -> Path:
    """A diffusers folder with configs and tokenizer files only, for ``from_single_file(config=...)``
    (SDXL: the UNet's config alone, the one network its benchmark loads)."""
    from latent_diffusion.checkpoints import diffusers_configs
    from latent_diffusion.models.tokenizer import load_clip_vocabulary

    def write(relative: str, data: dict) -> None:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2))

    write("unet/config.json", diffusers_configs.unet_config(spec))
    if spec.family == "sdxl":
        return folder
    write("vae/config.json", diffusers_configs.vae_config(spec))
    write("text_encoder/config.json", diffusers_configs.text_config(spec.conditioner))
    write("scheduler/scheduler_config.json", diffusers_configs.scheduler_config(spec))
    write("model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    vocabulary = load_clip_vocabulary()
    write("tokenizer/vocab.json", vocabulary.token_to_id)
    merges = "\n".join(" ".join(pair) for pair in vocabulary.merges)
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    write("tokenizer/tokenizer_config.json", {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                                              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                              "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    write("tokenizer/special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    return folder


def load_ours(path: Path, device: str, dtype: torch.dtype, **options):
    """Our pipeline from the single file (no hashing of the file: that is not part of loading a model)."""
    from latent_diffusion.checkpoints.load import load_checkpoint
    from latent_diffusion.pipelines.common import Pipeline

    if options.get("lean"):
        dtype = torch.float16  # lean mode keeps the weights in half precision from the start
    # bf16 mode converts the UNet as it loads, as Pipeline.from_checkpoint does.
    unet_dtype = torch.bfloat16 if options.get("bf16") else None
    loaded = load_checkpoint(path, dtype=dtype, device=device, unet_dtype=unet_dtype)
    if options.pop("plain", False):
        options["packed"] = False  # eager layers with plain weights: the path before packing
    return Pipeline(loaded, progress=False, **options)


def load_diffusers_unet(path: Path, config_folder: Path, device: str, dtype: torch.dtype):
    """diffusers' UNet alone from the same single file, offline (the SDXL benchmark's network)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config_folder), subfolder="unet",
                                                 local_files_only=True, torch_dtype=dtype)
    return unet.to(device).eval()


def load_diffusers(path: Path, config_folder: Path, device: str, dtype: torch.dtype):
    """diffusers' ``StableDiffusionPipeline`` from the same single file, offline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_folder), local_files_only=True, torch_dtype=dtype,
        safety_checker=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
