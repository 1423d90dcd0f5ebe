"""Stable Diffusion XL (Podell et al. 2023): base, refiner and inpainting.

Files keep the text encoders as ``conditioner.embedders.N`` (CLIP ViT-L and OpenCLIP ViT-bigG in
the base model, bigG alone in the refiner); the UNet takes a 2048-wide (refiner: 1280) context and
an ADM vector of the pooled bigG output and the size (refiner: aesthetic) micro-conditions.
"""
from __future__ import annotations

import dataclasses

from latent_diffusion import config as presets
from latent_diffusion.checkpoints.io import CheckpointError
from latent_diffusion.families.base import Component, Family
from latent_diffusion.families.derive import derive_clip_config
from latent_diffusion.config import MICRO_CONDITIONS
from latent_diffusion.families.features import EMBEDDERS_PREFIX, UNET_PREFIX, Features
from latent_diffusion.families.text import clip_tokenizer

_SDXL = dict(condition_encoder="embedders", first_stage="kl", cross_attention=True, label_embedding=False,
             low_scale_buffers=False)
_TEXT_ENCODER_NAMES = {"openai": "CLIP ViT-L/14", "openclip": "OpenCLIP ViT-bigG/14"}
# Where SDXL textual-inversion files keep each encoder's vectors.
_EMBEDDING_KEYS = {"openai": "clip_l", "openclip": "clip_g"}


class SDXL(Family):
    name = "sdxl"
    description = ("Stable Diffusion XL base: CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 (conditioner.embedders), "
                   "2048-wide context, size-conditioned ADM vector")
    preset = presets.SDXL
    requires = dict(embedders=("clip-openai", "openclip"), concat_channels=0, **_SDXL)
    conditioner_prefix = "conditioner."
    native_size = 1024
    default_guidance = 5.0
    align_your_steps_table = "sdxl"
    diffusers_pipeline = "StableDiffusionXLPipeline"

    def derive_conditioner(self, shapes, spec):
        conditioner = spec.conditioner
        encoders = tuple(derive_clip_config(shapes, base, f"{EMBEDDERS_PREFIX}{index}.")
                         for index, base in enumerate(conditioner.text_encoders))
        # The number embedders hold no weights; their width is what the ADM input leaves for them.
        numbers = sum(MICRO_CONDITIONS[name] for name in conditioner.micro_conditions)
        left = shapes[f"{UNET_PREFIX}label_emb.0.0.weight"][1] - encoders[conditioner.pooled_from].width
        fourier_dim = left // numbers if left > 0 and left % numbers == 0 else conditioner.fourier_dim
        return dataclasses.replace(conditioner, text_encoders=encoders, fourier_dim=fourier_dim)

    def check_spec(self, spec) -> None:
        conditioner, unet = spec.conditioner, spec.unet
        widths = [encoder.width for encoder in conditioner.text_encoders]
        parts = " + ".join(f"{_TEXT_ENCODER_NAMES[e.layout]} {e.width} (conditioner.embedders.{i})"
                           for i, e in enumerate(conditioner.text_encoders))
        if sum(widths) != unet.context_dim:
            raise CheckpointError(f"{self.name}: the text encoders give a {sum(widths)}-wide context ({parts}), but "
                                  f"the UNet cross-attends to {unet.context_dim}: an embedder is mis-shaped")
        if conditioner.vector_dim != unet.adm_in_channels:
            raise CheckpointError(f"{self.name}: the pooled text and micro-conditions make a {conditioner.vector_dim}-wide "
                                  f"vector, but the UNet's label_emb takes {unet.adm_in_channels}: the pooled "
                                  "encoder or the UNet is mis-shaped")

    def set_aside_reason(self, key: str, features: Features) -> str | None:
        if key.startswith(EMBEDDERS_PREFIX) and key.endswith(".model.logit_scale"):
            return "unused CLIP logit scale"
        if key == "denoiser.sigmas":
            return "noise levels of the training schedule (files saved by Stability's training code)"
        return super().set_aside_reason(key, features)

    def components(self, spec):
        # diffusers' names: the base model's CLIP-L is text_encoder, bigG text_encoder_2 (the refiner's too).
        encoders = spec.conditioner.text_encoders
        names = ["text_encoder", "text_encoder_2"][-len(encoders):]
        return super().components(spec)[:2] + [
            Component(name, f"{EMBEDDERS_PREFIX}{index}.", _TEXT_ENCODER_NAMES[encoder.layout], encoder)
            for index, (name, encoder) in enumerate(zip(names, encoders))
        ]

    def tokenizers(self, spec):
        return [clip_tokenizer(encoder) for encoder in spec.conditioner.text_encoders]

    def lora_prefixes(self, spec):
        # kohya numbers the encoders te1 (CLIP-L) and te2 (bigG); the refiner has bigG alone.
        encoders = {"text_encoder": ("lora_te1_", "text_encoder."), "text_encoder_2": ("lora_te2_", "text_encoder_2.")}
        present = {part.name for part in self.components(spec)}
        return {"unet": ("lora_unet_", "unet."), **{name: p for name, p in encoders.items() if name in present}}

    def embedding_keys(self, spec):
        return [_EMBEDDING_KEYS[encoder.layout] for encoder in spec.conditioner.text_encoders]

    def text_conditioner(self, model, dtype):
        from latent_diffusion.pipelines.text_conditioning import PromptEncoder, SDXLText

        conditioner = model.condition_encoder
        encoders = [PromptEncoder(encoder, tokenizer, clip=True)
                    for encoder, tokenizer in zip(conditioner.text_encoders, self.tokenizers(model.spec))]
        return SDXLText(conditioner, encoders, dtype)


class SDXLRefiner(SDXL):
    name = "sdxl-refiner"
    description = ("Stable Diffusion XL refiner: OpenCLIP ViT-bigG/14 alone, 1280-wide context, "
                   "aesthetic-score-conditioned ADM vector; denoises the last part of a base model's schedule")
    preset = presets.SDXL_REFINER
    requires = dict(embedders=("openclip",), concat_channels=0, **_SDXL)
    diffusers_pipeline = "StableDiffusionXLImg2ImgPipeline"
    finishes_only = True


class SDXLInpaint(SDXL):
    name = "sdxl-inpaint"
    description = "Stable Diffusion XL inpainting: the base model's encoders, 9 UNet input channels"
    preset = presets.SDXL_INPAINT
    requires = dict(embedders=("clip-openai", "openclip"), concat_channels=5, **_SDXL)
    diffusers_pipeline = "StableDiffusionXLInpaintPipeline"
