"""Text conditioning pieces that several families share: CLIP tokenizers and prompt encoders."""
from __future__ import annotations

from typing import TYPE_CHECKING

from latent_diffusion.config import CLIPTextConfig

if TYPE_CHECKING:
    import torch

    from latent_diffusion.models.tokenizer import CLIPTokenizer
    from latent_diffusion.pipelines.text_conditioning import CrossAttentionText


def clip_tokenizer(config: CLIPTextConfig) -> CLIPTokenizer:
    """The tokenizer a CLIP text tower was trained with: transformers' (pads with the end token)
    for OpenAI's layout, OpenCLIP's (pads with 0) for OpenCLIP's."""
    from latent_diffusion.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer(pad_with_eos=config.pad_with_eos, context_length=config.context_length,
                         normalization="transformers" if config.layout == "openai" else "openclip")


def cross_attention_text(encoder: torch.nn.Module, tokenizer, dtype: torch.dtype, *, clip: bool,
                         known_words: frozenset[str] | None = None) -> CrossAttentionText:
    """A single text encoder whose output is the context, with A1111's prompt syntax."""
    from latent_diffusion.pipelines.text_conditioning import CrossAttentionText, PromptEncoder

    return CrossAttentionText(PromptEncoder(encoder, tokenizer, clip=clip), dtype, known_words)
