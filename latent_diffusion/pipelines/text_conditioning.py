"""Prompts into the UNet's conditioning: the cross-attention context, and SDXL's ADM vector.

Every text-conditioned family hands its pipeline one of these objects (``Family.text_conditioner``).
They all take A1111's prompt syntax (emphasis, BREAK, prompts longer than 77 tokens in chunks),
except the short-window encoders that models of ours trained with fewer than 77 positions use.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from latent_diffusion.diffusion.denoiser import Conditioning
from latent_diffusion.pipelines.prompts import chunk_prompt, encode_weighted_prompts, parse_emphasis


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's numbers besides the text (Podell et al. 2023, Sec. 2.2), as A1111 sets them.

    Sizes are ``(width, height)`` in pixels; ``None`` means the image's own size (A1111's default:
    original = target = the generated size). The crop is ``(top, left)``. The refiner conditions on
    an aesthetic score instead of the target size: high for the prompt, low for the negative prompt.
    """

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def __post_init__(self) -> None:
        for name in ("original_size", "target_size"):
            size = getattr(self, name)
            if size is not None and (len(size) != 2 or min(size) < 1):
                raise ValueError(f"{name} must be (width, height) in pixels >= 1, got {size!r}")
        if len(self.crop_top_left) != 2 or min(self.crop_top_left) < 0:
            raise ValueError(f"crop_top_left must be (top, left) >= 0, got {self.crop_top_left!r}")

    def numbers(self, width: int, height: int, negative: bool) -> dict[str, list[float]]:
        """The values of every micro-condition for an image of ``width`` x ``height`` (sizes as (h, w))."""
        original = self.original_size or (width, height)
        target = self.target_size or (width, height)
        return {
            "original_size": [original[1], original[0]],
            "crop_coords_top_left": list(self.crop_top_left),
            "target_size": [target[1], target[0]],
            "aesthetic_score": [self.negative_aesthetic_score if negative else self.aesthetic_score],
        }

    def parameters(self) -> dict[str, str | int | None]:
        """What the PNG parameters record of the settings that differ from the defaults."""
        def size(value):
            return None if value is None else f"{value[0]}x{value[1]}"

        cropped = self.crop_top_left != (0, 0)
        return {"Original size": size(self.original_size), "Target size": size(self.target_size),
                "Crop top": self.crop_top_left[0] if cropped else None,
                "Crop left": self.crop_top_left[1] if cropped else None}


class TextConditioner(Protocol):
    """Turns a prompt and a negative prompt into the (cond, uncond) pair for one batch."""

    @property
    def prompt_encoders(self) -> list[PromptEncoder]: ...

    def encode_pair(self, prompt: str, negative_prompt: str, batch_size: int, *, clip_skip: int | None,
                    width: int, height: int, micro: MicroConditioning) -> tuple[Conditioning, Conditioning]: ...

    def prompt_warnings(self, prompt: str, negative_prompt: str) -> list[str]: ...


class PromptEncoder:
    """One text encoder with its tokenizer, reading A1111's prompt syntax in 77-token chunks."""

    def __init__(self, encoder: torch.nn.Module, tokenizer, *, clip: bool) -> None:
        self.encoder, self.tokenizer, self.clip = encoder, tokenizer, clip
        # The textual-inversion embeddings prompts may name (addons/embeddings.py); None: none.
        self.vocabulary = None

    def _encode_text(self, text: str):
        ids = self.tokenizer.encode(text)
        return ids if self.vocabulary is None else self.vocabulary.expand(ids)

    def _chunker(self, prompt: str):
        tokenizer = self.tokenizer
        return chunk_prompt(prompt, self._encode_text, start_token=tokenizer.start_id, end_token=tokenizer.end_id,
                            pad_token=tokenizer.pad_id, comma_token=tokenizer.token_to_id.get(",</w>"))

    def encode(self, prompts: Sequence[str], clip_skip: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(context ``[B, 77 * chunks, width]``, projected pooled output of each prompt's first chunk or None).

        All prompts passed together get the same number of chunks, so encode a batch's prompts and
        negative prompts in one call.
        """
        if clip_skip is not None and not self.clip:
            raise ValueError("clip skip applies to CLIP text encoders only")
        device = next(self.encoder.parameters()).device

        def encode_tokens(tokens: Tensor):
            tokens = tokens.to(device)
            if not self.clip:
                return self.encoder(tokens), None
            extra = None if self.vocabulary is None else self.vocabulary.vectors()
            encoding = self.encoder.encode(tokens, clip_skip=clip_skip, extra_vectors=extra)
            return encoding.hidden_states, encoding.projected

        with torch.no_grad():
            return encode_weighted_prompts(list(prompts), self._chunker, encode_tokens)


def unknown_words_warning(tokenizer, known_words: frozenset[str] | None, name: str, text: str) -> str | None:
    """A warning naming the words of ``text`` outside ``known_words`` (None: every word is known or
    the model's vocabulary is not recorded)."""
    if known_words is None:
        return None
    unknown = list(dict.fromkeys(word for word in tokenizer.words(text) if word not in known_words))
    if not unknown:
        return None
    return (f"the {name} has {len(unknown)} word(s) this model never saw in training: "
            f"{', '.join(map(repr, unknown))}; the image may not follow them")


class CrossAttentionText:
    """SD 1.x/2.x and the CompVis text models: the prompt is the cross-attention context, nothing else.

    ``known_words``: the words of the training captions of a model trained here (None: not recorded,
    as for every released model, whose tokenizer knows every word).
    """

    def __init__(self, encoder: PromptEncoder, dtype: torch.dtype, known_words: frozenset[str] | None = None) -> None:
        self.prompts, self.dtype, self.known_words = encoder, dtype, known_words

    @property
    def prompt_encoders(self) -> list[PromptEncoder]:
        return [self.prompts]

    def encode(self, prompts: Sequence[str], clip_skip: int | None = None) -> Tensor:
        return self.prompts.encode(prompts, clip_skip)[0].to(self.dtype)

    def prompt_warnings(self, prompt: str, negative_prompt: str) -> list[str]:
        """What the encoder cannot read of the prompts: words outside a recorded vocabulary (long
        prompts go in 77-token chunks, so nothing is cut)."""
        found = []
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            # The emphasis syntax is not text the encoder reads.
            plain = " ".join(run.text for run in parse_emphasis(text) if not run.is_break)
            found.append(unknown_words_warning(self.prompts.tokenizer, self.known_words, name, plain))
        return [warning for warning in found if warning]

    def encode_pair(self, prompt: str, negative_prompt: str, batch_size: int, *, clip_skip: int | None,
                    width: int, height: int, micro: MicroConditioning) -> tuple[Conditioning, Conditioning]:
        # An empty negative prompt encodes "" (A1111), so both always come from the encoder.
        both = self.encode([prompt, negative_prompt], clip_skip)
        return (Conditioning(context=both[:1].expand(batch_size, -1, -1)),
                Conditioning(context=both[1:].expand(batch_size, -1, -1)))


class ShortWindowText(CrossAttentionText):
    """Encoders of ours trained with fewer than 77 positions (the built-in model): the training
    tokenisation -- one window, no emphasis syntax, no chunks.

    ``known_words``: the words of its training captions (None: unknown). What such a model cannot
    read -- words it never saw, tokens past its window -- is reported by :meth:`prompt_warnings`.
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer, dtype: torch.dtype,
                 known_words: frozenset[str] | None = None) -> None:
        self.encoder, self.tokenizer, self.dtype = encoder, tokenizer, dtype
        self.known_words = known_words

    def prompt_warnings(self, prompt: str, negative_prompt: str) -> list[str]:
        warnings = []
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            unknown = unknown_words_warning(self.tokenizer, self.known_words, name, text)
            warnings += [w for w in (unknown, self._cut(name, text)) if w]
        return warnings

    def _cut(self, name: str, text: str) -> str | None:
        room = self.tokenizer.context_length - 2  # the start and end tokens take two positions
        words = self.tokenizer.words(text)
        counts = [len(self.tokenizer.encode(word)) for word in words]
        if sum(counts) <= room:
            return None
        first_cut = next(i for i, end in enumerate(itertools.accumulate(counts)) if end > room)
        dropped = " ".join(words[first_cut:])
        return (f"the {name} is {sum(counts)} tokens long but this model's text encoder reads {room}; "
                f"the last {sum(counts) - room} token(s) were dropped ({dropped!r})")

    @property
    def prompt_encoders(self) -> list[PromptEncoder]:
        return []  # one window of plain tokens: no embeddings

    def encode(self, prompts: Sequence[str], clip_skip: int | None = None) -> Tensor:
        if clip_skip is not None:
            raise ValueError("clip skip applies to CLIP text encoders only")
        device = next(self.encoder.parameters()).device
        with torch.no_grad():
            return self.encoder(self.tokenizer(list(prompts)).to(device)).to(self.dtype)


class SDXLText:
    """SDXL: both encoders' hidden states side by side as the context; the pooled text and the
    micro-conditions as the ADM vector. An empty negative prompt is all zeros there (A1111 and
    diffusers both do this for SDXL)."""

    def __init__(self, conditioner: torch.nn.Module, encoders: Sequence[PromptEncoder], dtype: torch.dtype) -> None:
        self.conditioner, self.encoders, self.dtype = conditioner, list(encoders), dtype

    @property
    def prompt_encoders(self) -> list[PromptEncoder]:
        return self.encoders

    def prompt_warnings(self, prompt: str, negative_prompt: str) -> list[str]:
        return []  # CLIP tokenizers know every word; long prompts go in 77-token chunks

    def encode(self, prompts: Sequence[str], clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """(context ``[B, 77 * chunks, sum of widths]``, pooled ``[B, width]`` of the pooled encoder)."""
        if clip_skip is not None:
            raise ValueError("clip skip does not apply to SDXL: it reads both text encoders' penultimate layer")
        outputs = [encoder.encode(prompts) for encoder in self.encoders]
        if len({context.shape[1] for context, _ in outputs}) != 1:
            raise ValueError("the text encoders split the prompt into different numbers of chunks")
        pooled = outputs[self.conditioner.config.pooled_from][1]
        return torch.cat([context for context, _ in outputs], dim=-1), pooled

    def encode_pair(self, prompt: str, negative_prompt: str, batch_size: int, *, clip_skip: int | None,
                    width: int, height: int, micro: MicroConditioning) -> tuple[Conditioning, Conditioning]:
        context, pooled = self.encode([prompt, negative_prompt], clip_skip)
        if negative_prompt == "":
            context[1:], pooled[1:] = 0, 0

        def conditioning(index: int) -> Conditioning:
            numbers = {name: torch.tensor([values] * batch_size, dtype=torch.float32)
                       for name, values in micro.numbers(width, height, negative=index == 1).items()}
            with torch.no_grad():
                vector = self.conditioner.vector(pooled[index:index + 1].expand(batch_size, -1), numbers)
            return Conditioning(context=context[index:index + 1].expand(batch_size, -1, -1).to(self.dtype),
                                y=vector.to(self.dtype))

        return conditioning(0), conditioning(1)
