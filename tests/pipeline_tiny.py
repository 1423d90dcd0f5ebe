"""Tiny random-weight models saved as single files, and diffusers pipelines built from the same weights."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from latent_diffusion.checkpoints.io import save_safetensors
from latent_diffusion.config import SD1, SD2_X4_UPSCALER, AutoencoderConfig, ClassEmbedderConfig, ModelSpec
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
    """Our checkpoint as a diffusers folder, plus a transformers tokenizer on our vocabulary."""
    from latent_diffusion.checkpoints.convert import save_diffusers_folder
    from latent_diffusion.checkpoints.load import load_checkpoint

    save_diffusers_folder(load_checkpoint(checkpoint, family=family), folder)
    (folder / "tokenizer").mkdir(exist_ok=True)
    write_clip_tokenizer_files(folder / "tokenizer")
    return folder


def write_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json and merges.txt of our packaged CLIP vocabulary, for transformers' CLIPTokenizer."""
    from latent_diffusion.models.tokenizer import load_clip_vocabulary

    vocabulary = load_clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocabulary.token_to_id), encoding="utf-8")
    merges = "\n".join(" ".join(pair) for pair in vocabulary.merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return folder


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
