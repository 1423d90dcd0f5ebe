"""What a pipeline's prompts name besides words: LoRAs (``<lora:name:w>``) and embeddings (by name).

Before a prompt is encoded, the LoRAs its tags name -- exactly those -- are merged into the weights
(a prompt without tags puts the original weights back), the tags are taken out, and every CLIP
text encoder is given the embeddings folder so that names in the prompt become their vectors. The
PNG parameters then record the files' short hashes as A1111 does (``Lora hashes``, ``TI hashes``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from latent_diffusion.addons.embeddings import EmbeddingLibrary, EmbeddingVocabulary
from latent_diffusion.addons.library import LoraLibrary
from latent_diffusion.addons.lora_merge import LoraUse, MergedLoras
from latent_diffusion.addons.prompt_tags import LoraTag, lora_tags, without_lora_tags

if TYPE_CHECKING:
    from latent_diffusion.pipelines.common import Pipeline


def _hash_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # the parameters text separates entries by these


class PromptAddons:
    """The LoRA and embedding folders of one pipeline, and the LoRAs merged into its weights."""

    def __init__(self, pipe: Pipeline, lora_dir: str | os.PathLike | None = None,
                 embeddings_dir: str | os.PathLike | None = None) -> None:
        self.pipe = pipe
        self.loras = LoraLibrary(lora_dir)
        self.embeddings = EmbeddingLibrary(embeddings_dir)
        self._merged: MergedLoras | None = None
        self._embedding_keys = pipe.family.embedding_keys(pipe.spec)
        self.warnings: list[str] = []  # taken by the task that runs next

    def share_folders(self, loras: LoraLibrary, embeddings: EmbeddingLibrary) -> None:
        """Read names from these folders (a server's, shared by every model it loads)."""
        self.loras, self.embeddings = loras, embeddings

    @staticmethod
    def tags(*prompts: str) -> list[LoraTag]:
        """The ``<lora:...>`` tags of the prompts (a malformed one is a ValueError naming it)."""
        return [tag for prompt in prompts for tag in lora_tags(prompt)]

    def apply(self, *prompts: str) -> list[str]:
        """Merge the LoRAs the prompts name, give the encoders the embeddings; the prompts without tags."""
        uses = [LoraUse(self.loras.read(tag.name), unet=tag.unet, text=tag.text) for tag in self.tags(*prompts)]
        if uses or self._merged is not None:
            if self._merged is None:
                self._merged = MergedLoras(self.pipe.model, self.pipe.family, self.pipe.spec)
            changed, warnings = self._merged.apply(uses)
            self.warnings += [warning for warning in warnings if warning not in self.warnings]
            if changed:
                self.pipe.weights_changed()
        self._give_embeddings()
        return [without_lora_tags(prompt) for prompt in prompts]

    def _give_embeddings(self) -> None:
        encoders = [encoder for encoder in self.pipe.text.prompt_encoders if encoder.clip]
        for encoder, key in zip(encoders, self._embedding_keys):
            vocabulary = encoder.vocabulary
            if vocabulary is None or vocabulary.library is not self.embeddings:
                config = encoder.encoder.config
                encoder.vocabulary = EmbeddingVocabulary(self.embeddings, encoder.tokenizer.encode, key, config.width,
                                                         config.vocab_size)

    def parameters(self, prompt: str, negative_prompt: str) -> dict[str, Any]:
        """``Lora hashes`` and ``TI hashes`` of the files the prompts name (None: none named)."""
        loras = dict.fromkeys(tag.name for tag in self.tags(prompt, negative_prompt))
        lora_text = ", ".join(f"{_hash_name(name)}: {self.loras.short_hash(name)}" for name in loras)
        used: set[str] = set()
        encoders = [encoder for encoder in self.pipe.text.prompt_encoders if encoder.vocabulary is not None] \
            if self.pipe.takes_text else []
        if encoders:
            for text in (prompt, negative_prompt):
                encoders[0].vocabulary.expand(encoders[0].tokenizer.encode(without_lora_tags(text)), used)
        ti_text = ", ".join(f"{_hash_name(name)}: {self.embeddings.short_hash(name)}" for name in sorted(used))
        return {"Lora hashes": lora_text or None, "TI hashes": ti_text or None}

    def take_warnings(self) -> list[str]:
        warnings, self.warnings = self.warnings, []
        return warnings
