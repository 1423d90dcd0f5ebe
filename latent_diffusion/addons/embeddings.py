"""Textual-inversion embeddings: extra token vectors that a prompt names by the file's name (A1111).

Files read: A1111's ``.pt`` (``string_to_param``, with ``step`` and the checkpoint it was trained
on), ``.safetensors`` holding ``emb_params``, SDXL's ``clip_l`` / ``clip_g`` pair, and diffusers'
one-tensor ``learned_embeds``. An embedding of n vectors takes n token positions where the prompt
names it, weighted like the words around it, and is never split across two 77-token chunks.

The vectors reach the encoder as token ids past its vocabulary (``vocab_size + i`` is vector i of
the table :class:`EmbeddingVocabulary` keeps), so the prompt machinery stays a list of ids.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latent_diffusion.addons.library import AddonFolder, default_embeddings_dir
from latent_diffusion.checkpoints.io import CheckpointError, read_saved_object

SDXL_KEYS = ("clip_l", "clip_g")


@dataclass
class Embedding:
    """One embedding file: its vectors for each text encoder it was made for (key None: the only set)."""

    name: str
    path: Path
    vectors: dict[str | None, Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # step, sd_checkpoint, sd_checkpoint_name

    def for_encoder(self, key: str | None, width: int) -> Tensor:
        """The vectors for the encoder that ``key`` names; a ValueError naming the embedding if it has
        none of that width."""
        vectors = self.vectors.get(key)
        if vectors is None or vectors.shape[1] != width:
            made = ", ".join(f"{k or 'one encoder'}: {v.shape[1]} wide" for k, v in self.vectors.items())
            raise ValueError(f"embedding {self.name!r} ({self.path}) does not fit this model's text encoder "
                             f"({key + ', ' if key else ''}{width} wide): it holds {made}, made for another model")
        return vectors


def _encoder_widths(spec) -> list[int]:
    conditioner = spec.conditioner
    encoders = getattr(conditioner, "text_encoders", None) or [conditioner]
    return [getattr(encoder, "width", None) for encoder in encoders]


def fits(embedding: Embedding, family, spec) -> bool:
    """Whether the embedding has vectors of the right width for every text encoder of a model."""
    keys = family.embedding_keys(spec)
    return bool(keys) and all(key in embedding.vectors and embedding.vectors[key].shape[1] == width
                              for key, width in zip(keys, _encoder_widths(spec)))


def made_for(embedding: Embedding) -> str | None:
    """The first released family whose text encoders the embedding fits (None: none)."""
    from latent_diffusion.families import FAMILIES

    return next((family.name for family in FAMILIES if family.preset is not None and family.requires is not None
                 and family.takes_text(family.preset) and fits(embedding, family, family.preset)), None)


def _vector_sets(path: Path, saved: dict) -> dict[str | None, Any]:
    if isinstance(saved.get("string_to_param"), dict) and saved["string_to_param"]:
        return {None: next(iter(saved["string_to_param"].values()))}
    if "emb_params" in saved:
        return {None: saved["emb_params"]}
    if any(key in saved for key in SDXL_KEYS):
        return {key: saved[key] for key in SDXL_KEYS if key in saved}
    tensors = [value for value in saved.values() if isinstance(value, Tensor)]
    if len(tensors) == 1:  # diffusers' learned_embeds: {"<token>": vectors}
        return {None: tensors[0]}
    raise CheckpointError(f"{path}: not a textual-inversion embedding (keys {sorted(map(str, saved))[:6]})")


def read_embedding(path: str | os.PathLike) -> Embedding:
    path = Path(path)
    saved = read_saved_object(path)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: holds a {type(saved).__name__}, not a textual-inversion embedding")
    vectors = {}
    for key, value in _vector_sets(path, saved).items():
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() not in (1, 2) or not value.numel():
            raise CheckpointError(f"{path}: the embedding's vectors are not a [count, width] float tensor")
        vectors[key] = value.detach().reshape(-1, value.shape[-1]).float()
    info = {name: saved.get(name) for name in ("step", "sd_checkpoint", "sd_checkpoint_name")
            if isinstance(saved.get(name), (int, str))}
    return Embedding(path.stem, path, vectors, info)


class EmbeddingLibrary(AddonFolder):
    kind = "embedding"

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        super().__init__(folder, read_embedding)

    @staticmethod
    def default_folder() -> Path:
        return default_embeddings_dir()


class EmbeddingVocabulary:
    """For one text encoder: the token ids of every embedding's name, and the vectors prompts used so far."""

    def __init__(self, library: EmbeddingLibrary, encode_text, key: str | None, width: int, vocab_size: int) -> None:
        self.library, self.encode_text, self.key, self.width, self.vocab_size = library, encode_text, key, width, vocab_size
        self._listing: dict[str, Path] | None = None
        self._names: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        self._placed: dict[str, tuple[int, ...]] = {}
        self._vectors: list[Tensor] = []
        self._count = 0

    def _names_by_first_token(self) -> dict[int, list[tuple[tuple[int, ...], str]]]:
        listing = self.library.files()
        if listing is not self._listing:  # the folder was looked at again: start over
            self._listing, self._names, self._placed, self._vectors, self._count = listing, {}, {}, [], 0
            for name in listing:
                ids = tuple(self.encode_text(name))
                if ids:
                    self._names.setdefault(ids[0], []).append((ids, name))
            for candidates in self._names.values():
                candidates.sort(key=lambda item: -len(item[0]))  # the longest name that matches wins
        return self._names

    def _placeholders(self, name: str) -> tuple[int, ...]:
        if name not in self._placed:
            vectors = self.library.read(name).for_encoder(self.key, self.width)
            self._placed[name] = tuple(range(self.vocab_size + self._count, self.vocab_size + self._count + len(vectors)))
            self._vectors.append(vectors)
            self._count += len(vectors)
        return self._placed[name]

    def expand(self, ids: list[int], used: set[str] | None = None) -> list[int | tuple[int, ...]]:
        """``ids`` with every embedding name replaced by a tuple of its vectors' ids (kept together)."""
        names = self._names_by_first_token()
        out: list[int | tuple[int, ...]] = []
        position = 0
        while position < len(ids):
            for name_ids, name in names.get(ids[position], ()):
                if tuple(ids[position:position + len(name_ids)]) == name_ids:
                    out.append(self._placeholders(name))
                    if used is not None:
                        used.add(name)
                    position += len(name_ids)
                    break
            else:
                out.append(ids[position])
                position += 1
        return out

    def vectors(self) -> Tensor | None:
        """The table the ids past the vocabulary index (None while no prompt named an embedding)."""
        return torch.cat(self._vectors) if self._vectors else None
