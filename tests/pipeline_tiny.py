"""Tiny random-weight models saved as single files, diffusers pipelines built from the same weights, and
small input images for the tasks."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.config import (
    SD1, SD2_X4_UPSCALER, SDXL, SDXL_REFINER, AutoencoderConfig, ClassEmbedderConfig, ModelSpec,
)
from latent_diffusion.models.ldm import LatentDiffusion

# Full CLIP vocabulary (our tokenizer's ids), everything else tiny. The VAE downsamples by 4 with
# three levels, so 32x32 images are 8x8 latents and the UNet's two levels still divide them.
TINY_VAE = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
TINY_TEXT = dataclasses.replace(SD1.conditioner, width=32, layers=2, heads=1)
TINY_UNET = dataclasses.replace(SD1.unet, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(1, 2), num_heads=8, context_dim=32)
TINY_SD1 = dataclasses.replace(SD1, unet=TINY_UNET, autoencoder=TINY_VAE, conditioner=TINY_TEXT)
TINY_SD1_INPAINT = dataclasses.replace(TINY_SD1, family="sd1-inpaint", conditioning="hybrid",
                                       unet=dataclasses.replace(TINY_UNET, in_channels=9))
TINY_X4 = dataclasses.replace(
    SD2_X4_UPSCALER,
    # Text wider than the UNet features, so that disabled self-attention shows in the shapes.
    unet=dataclasses.replace(SD2_X4_UPSCALER.unet, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                             attention_resolutions=(2, 4), context_dim=128,
                             disable_self_attentions=(True, True, False)),
    autoencoder=TINY_VAE,
    conditioner=dataclasses.replace(SD2_X4_UPSCALER.conditioner, width=128, layers=3, heads=2),
)
# SDXL's structure in miniature: a level without attention, per-level transformer depth, two text
# encoders (CLIP-L and bigG layouts) whose penultimate layers make the context, the pooled bigG
# output and 8-wide Fourier features of the sizes in the ADM vector.
# Head widths are SDXL's 64 (files cannot state another), so the attention levels are 64 and 128 wide.
_TINY_XL_TEXT = tuple(dataclasses.replace(encoder, width=64, layers=3, heads=1)
                      for encoder in SDXL.conditioner.text_encoders)
TINY_SDXL = dataclasses.replace(
    SDXL,
    unet=dataclasses.replace(SDXL.unet, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                             transformer_depth=(0, 1, 2), transformer_depth_middle=None,
                             context_dim=128, adm_in_channels=64 + 6 * 8),
    autoencoder=TINY_VAE,
    conditioner=dataclasses.replace(SDXL.conditioner, text_encoders=_TINY_XL_TEXT, fourier_dim=8),
)
TINY_SDXL_REFINER = dataclasses.replace(
    SDXL_REFINER,
    unet=dataclasses.replace(SDXL_REFINER.unet, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                             transformer_depth=2, context_dim=64, adm_in_channels=64 + 5 * 8),
    autoencoder=TINY_VAE,
    conditioner=dataclasses.replace(SDXL_REFINER.conditioner, text_encoders=_TINY_XL_TEXT[1:], fourier_dim=8),
)
TINY_CLASS = ModelSpec(
    "custom",
    dataclasses.replace(TINY_UNET, context_dim=32),
    TINY_VAE,
    ClassEmbedderConfig(n_classes=5, embed_dim=32),
)


def random_state(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial scale everywhere (zero-initialised output convs would hide bugs)."""
    torch.manual_seed(seed)
    model = LatentDiffusion(spec)
    state = {}
    generator = torch.Generator().manual_seed(seed)
    for key, value in model.state_dict().items():
        if value.is_floating_point() and value.ndim >= 1 and key.endswith("weight") and value.abs().max() == 0:
            value = torch.randn(value.shape, generator=generator) * 0.3
        elif key.endswith(("norm.bias", "ln_final.bias", "final_layer_norm.bias")):
            # Trained text towers end in a biased LayerNorm; a zero-mean context would be untypical.
            value = torch.randn(value.shape, generator=generator) * 0.3
        state[key] = value.detach().contiguous()  # shares the fresh model's storage: no second copy
    return state


def write_checkpoint(spec: ModelSpec, path: Path, seed: int = 0) -> Path:
    save_safetensors(random_state(spec, seed), path)
    return path


def diffusers_folder(checkpoint: Path, folder: Path, family: str | None = None) -> Path:
    """Our checkpoint as a diffusers folder, plus transformers tokenizers on our vocabulary."""
    from latent_diffusion.checkpoints.convert import save_diffusers_folder
    from latent_diffusion.checkpoints.load import load_checkpoint

    save_diffusers_folder(load_checkpoint(checkpoint, family=family), folder)
    for text_encoder in ("text_encoder", "text_encoder_2"):
        if (folder / text_encoder).is_dir():
            tokenizer = folder / text_encoder.replace("text_encoder", "tokenizer")
            tokenizer.mkdir(exist_ok=True)
            write_clip_tokenizer_files(tokenizer)
    return folder


def write_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json and merges.txt of our packaged CLIP vocabulary, for transformers' CLIPTokenizer."""
    from latent_diffusion.models.tokenizer import load_clip_vocabulary

    vocabulary = load_clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocabulary.token_to_id), encoding="utf-8")
    merges = "\n".join(" ".join(pair) for pair in vocabulary.merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return folder


def sdxl_components(folder: Path) -> dict:
    """unet, vae, text encoders and tokenizers of an SDXL folder written by :func:`diffusers_folder`
    (the second tokenizer pads with "!", id 0, as SDXL's does)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def tokenizer(name: str, **options):
        return CLIPTokenizer(vocab=str(folder / name / "vocab.json"), merges=str(folder / name / "merges.txt"),
                             model_max_length=77, **options)

    components = dict(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2",
                                                                   local_files_only=True).eval(),
        tokenizer_2=tokenizer("tokenizer_2", pad_token="!"),
    )
    if (folder / "text_encoder").is_dir():
        components.update(
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval(),
            tokenizer=tokenizer("tokenizer"))
    return components


def diffusers_components(folder: Path) -> dict:
    """unet, vae, text_encoder, tokenizer of a folder written by :func:`diffusers_folder`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval(),
        tokenizer=CLIPTokenizer(vocab=str(folder / "tokenizer" / "vocab.json"),
                                merges=str(folder / "tokenizer" / "merges.txt"), model_max_length=77),
    )


SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                    steps_offset=1)


def write_task_images(folder: Path) -> Path:
    """``image.png`` (32 px noise), ``small.png`` (16 px, an upscaler's input) and ``mask.png`` (a white square)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "image.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "small.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder
