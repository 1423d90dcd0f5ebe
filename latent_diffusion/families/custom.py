"""Models trained by this package (the built-in shapes models among them): their files state their spec.

Their sizes match no preset and head counts cannot be read from shapes, so ``ldm train`` writes the
exact spec into the safetensors header (and a CompVis YAML beside the file where one can state it).
What such a model does follows from that spec.
"""
from __future__ import annotations

import functools

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
        known = self.known_words(model.spec)
        if isinstance(text, BERTTextConfig) and text.max_seq_len < _FULL_WINDOW:
            return ShortWindowText(model.condition_encoder, tokenizer, dtype, known)
        return cross_attention_text(model.condition_encoder, tokenizer, dtype, clip=isinstance(text, CLIPTextConfig),
                                    known_words=known)

    def known_words(self, spec) -> frozenset[str] | None:
        """The words the model's text encoder was trained on (None: it reads any, or it is not known).

        Files of ours state them (``BERTTextConfig.vocabulary``). The short-window encoders of files
        written before that -- the built-in model's among them -- all learnt the shapes caption
        grammar (configs/shapes), so their words are the grammar's.
        """
        text = spec.conditioner
        if not isinstance(text, BERTTextConfig):
            return None  # a frozen CLIP encoder: its tokenizer knows every word
        if text.vocabulary is not None:
            return frozenset(text.vocabulary)
        if text.max_seq_len < _FULL_WINDOW:
            return shapes_grammar_words()
        return None


@functools.lru_cache(maxsize=1)
def shapes_grammar_words() -> frozenset[str]:
    """Every word (as the tokenizer splits text) of the shapes world's caption grammar."""
    from latent_diffusion.data.shapes import grammar_captions

    return caption_words(grammar_captions())


def caption_words(captions) -> frozenset[str]:
    """The words (tokenizer pre-tokens) of ``captions``: what a text encoder trained on them has seen."""
    from latent_diffusion.models.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    return frozenset(word for caption in captions for word in tokenizer.words(caption))
