"""Stable Diffusion 1.x and 2.x: one CLIP text encoder under ``cond_stage_model``, the KL-f8 VAE."""
from __future__ import annotations

from latent_diffusion import config as presets
from latent_diffusion.families.base import Family
from latent_diffusion.families.derive import derive_clip_config
from latent_diffusion.families.features import COND_PREFIX, Features
from latent_diffusion.families.text import clip_tokenizer, cross_attention_text

_SD_TEXT = dict(first_stage="kl", cross_attention=True, label_embedding=False, adm_channels=None,
                low_scale_buffers=False)


class SD1(Family):
    name = "sd1"
    description = "Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, 768-wide context, eps prediction"
    preset = presets.SD1
    requires = dict(condition_encoder="clip-openai", concat_channels=0, **_SD_TEXT)
    diffusers_pipeline = "StableDiffusionPipeline"

    def derive_conditioner(self, shapes, spec):
        return derive_clip_config(shapes, spec.conditioner, COND_PREFIX)

    def tokenizers(self, spec):
        return [clip_tokenizer(spec.conditioner)]

    def text_conditioner(self, model, dtype):
        return cross_attention_text(model.condition_encoder, self.tokenizers(model.spec)[0], dtype, clip=True)


class SD1Inpaint(SD1):
    name = "sd1-inpaint"
    description = "Stable Diffusion 1.x inpainting: 9 UNet input channels (latent, mask, masked image)"
    preset = presets.SD1_INPAINT
    requires = dict(condition_encoder="clip-openai", concat_channels=5, **_SD_TEXT)
    diffusers_pipeline = "StableDiffusionInpaintPipeline"


class SD2(SD1):
    name = "sd2"
    description = ("Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder, 1024-wide context. The keys cannot "
                   "tell the 512 px eps model from the 768 px v model: eps is assumed, pass prediction='v' "
                   "for 768-v checkpoints (e.g. v2-1_768-ema-pruned)")
    preset = presets.SD2
    requires = dict(condition_encoder="openclip", concat_channels=0, **_SD_TEXT)

    def with_prediction(self, prediction):
        from latent_diffusion.families import get_family

        return get_family("sd2-v") if prediction == "v" else self

    def set_aside_reason(self, key: str, features: Features) -> str | None:
        if key in (f"{COND_PREFIX}model.logit_scale", f"{COND_PREFIX}model.text_projection"):
            return "unused CLIP projection"
        return super().set_aside_reason(key, features)


class SD2V(SD2):
    name = "sd2-v"
    description = "Stable Diffusion 2.x 768 px, v prediction (OpenCLIP ViT-H/14 text encoder)"
    preset = presets.SD2_V
    requires = None  # the same keys as sd2: reached through prediction="v"
    native_size = 768

    def with_prediction(self, prediction):
        from latent_diffusion.families import get_family

        return get_family("sd2") if prediction in ("eps", "x0") else self


class SD2Inpaint(SD2):
    name = "sd2-inpaint"
    description = "Stable Diffusion 2 inpainting: OpenCLIP text, 9 UNet input channels"
    preset = presets.SD2_INPAINT
    requires = dict(condition_encoder="openclip", concat_channels=5, **_SD_TEXT)
    diffusers_pipeline = "StableDiffusionInpaintPipeline"

    def with_prediction(self, prediction):
        return self


class SD2Upscaler(SD2):
    name = "sd2-x4-upscaler"
    description = ("Stable Diffusion x4 upscaler: OpenCLIP text, 7 UNet input channels "
                   "(latent + low-resolution image), noise level via the class embedding")
    preset = presets.SD2_X4_UPSCALER
    requires = dict(condition_encoder="openclip", first_stage="kl", concat_channels=3, label_embedding=True,
                    cross_attention=True)
    diffusers_pipeline = "StableDiffusionUpscalePipeline"
    default_guidance = 9.0

    def with_prediction(self, prediction):
        return self

    def set_aside_reason(self, key: str, features: Features) -> str | None:
        if key.startswith("low_scale_model."):
            return "noise-augmentation schedule of the low-resolution image"
        return super().set_aside_reason(key, features)

    def diffusers_sample_size(self, spec) -> int:
        return 128
