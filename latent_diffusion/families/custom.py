"""Models trained by this package (the built-in shapes models among them): their files state their spec.

Their sizes match no preset and head counts cannot be read from shapes, so ``ldm train`` writes the
exact spec into the safetensors header (and a CompVis YAML beside the file where one can state it).
What such a model does follows from that spec.
"""
from __future__ import annotations

from latent_diffusion.config import BERTTextConfig, CLIPTextConfig
from latent_diffusion.families.base import Family
from latent_diffusion.families.text import clip_tokenizer, cross_attention_text

# Every text encoder trained here reads the full-size CLIP vocabulary.
_FULL_WINDOW = 77


class Custom(Family):
    name = "custom"
    description = "a model trained with this package (its file states the exact architecture)"
    requires = None

    def native_image_size(self, spec) -> int:
        return int(spec.autoencoder.resolution)

    def tokenizers(self, spec):
        from latent_diffusion.models.tokenizer import CLIPTokenizer

        text = spec.conditioner
        if isinstance(text, CLIPTextConfig):
            return [clip_tokenizer(text)]
        if isinstance(text, BERTTextConfig):
            return [CLIPTokenizer(pad_with_eos=True, context_length=text.max_seq_len)]
        return []

    def text_conditioner(self, model, dtype):
        from latent_diffusion.pipelines.text_conditioning import ShortWindowText

        text = model.spec.conditioner
        if not self.takes_text(model.spec):
            return None
        tokenizer = self.tokenizers(model.spec)[0]
        if isinstance(text, BERTTextConfig) and text.max_seq_len < _FULL_WINDOW:
            return ShortWindowText(model.condition_encoder, tokenizer, dtype)
        return cross_attention_text(model.condition_encoder, tokenizer, dtype, clip=isinstance(text, CLIPTextConfig))
