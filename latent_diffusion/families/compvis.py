"""The latent-diffusion paper's released models (CompVis): VQ first stages, class, BERT or image conditions."""
from __future__ import annotations

from latent_diffusion import config as presets
from latent_diffusion.families.base import Family
from latent_diffusion.families.derive import derive_bert_config, derive_class_embedder_config
from latent_diffusion.families.features import COND_PREFIX, Features
from latent_diffusion.families.text import cross_attention_text

CLIP_VOCAB_SIZE = 49408


class LDMClassConditional(Family):
    name = "ldm-cin256"
    description = "LDM class-conditional ImageNet 256: class embedding by cross-attention, VQ-f8"
    preset = presets.LDM_CIN256
    requires = dict(condition_encoder="class", first_stage="vq", concat_channels=0, cross_attention=True)
    native_size = 256
    default_guidance = 1.0

    def derive_conditioner(self, shapes, spec):
        return derive_class_embedder_config(shapes, COND_PREFIX)


class LDMText2Img(Family):
    name = "ldm-text2img256"
    description = "LDM text-to-image 256 (LAION-400M): BERT-style text transformer, VQ-f4"
    preset = presets.LDM_TEXT2IMG256
    requires = dict(condition_encoder="bert", first_stage="vq", concat_channels=0, cross_attention=True)
    native_size = 256
    default_guidance = 5.0

    def derive_conditioner(self, shapes, spec):
        return derive_bert_config(shapes, spec.conditioner, COND_PREFIX)

    def tokenizers(self, spec):
        from latent_diffusion.models.tokenizer import CLIPTokenizer

        if spec.conditioner.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(
                f"this {self.name!r} model's text encoder has a {spec.conditioner.vocab_size}-word vocabulary "
                "(bert-base-uncased WordPiece), which is not shipped with this package; only BERT-style encoders "
                f"over the CLIP vocabulary ({CLIP_VOCAB_SIZE} words) can take prompts here"
            )
        # Encoders of this kind trained here use the CLIP vocabulary (training/ldm_model.py).
        return [CLIPTokenizer(pad_with_eos=True, context_length=spec.conditioner.max_seq_len)]

    def text_conditioner(self, model, dtype):
        return cross_attention_text(model.condition_encoder, self.tokenizers(model.spec)[0], dtype, clip=False)


class LDMSuperResolution(Family):
    name = "ldm-sr"
    description = "LDM 4x super-resolution: low-resolution image concatenated (6 channels), no text"
    preset = presets.LDM_BSR_SR
    requires = dict(condition_encoder=None, first_stage="vq", concat_channels=3, cross_attention=False)
    default_guidance = 1.0


class LDMInpaint(Family):
    name = "ldm-inpaint"
    description = "LDM inpainting: masked image and mask concatenated (7 channels), VQ-f4 without attention"
    preset = presets.LDM_INPAINT
    requires = dict(condition_encoder=(None, "first-stage"), first_stage="vq", concat_channels=4,
                    cross_attention=False, first_stage_mid_attention=False)
    default_guidance = 1.0

    def set_aside_reason(self, key: str, features: Features) -> str | None:
        if key.startswith(COND_PREFIX) and features.condition_encoder == "first-stage":
            return "second copy of the first stage (conditioning by the autoencoder)"
        return super().set_aside_reason(key, features)
