"""LoRAs and embeddings over the API, answered as A1111 answers them.

``GET /sdapi/v1/loras`` lists the LoRA folder (name, alias, path, the file's metadata);
``POST /sdapi/v1/refresh-loras`` and ``/refresh-embeddings`` look at the folders again;
``GET /sdapi/v1/embeddings`` splits the embeddings folder into those that fit the loaded model
(``loaded``) and those that do not (``skipped``). Paths are given inside their folder, never whole.
Prompts name both as everywhere else (``<lora:name:w>``, an embedding's name).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from fastapi import FastAPI
from pydantic import BaseModel

from latent_diffusion.addons.embeddings import fits
from latent_diffusion.checkpoints.io import CheckpointError

if TYPE_CHECKING:
    from latent_diffusion.server.app import ServerState


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


def _lora_items(state: ServerState) -> list[LoraItem]:
    items = []
    for name in state.loras.names():
        try:
            entry = state.loras.describe(name)
        except (CheckpointError, OSError):  # an unreadable file is left out of the listing
            continue
        items.append(LoraItem(name=entry["name"], alias=entry["alias"], path=entry["path"], metadata=entry["metadata"]))
    return items


def _embeddings(state: ServerState) -> EmbeddingsResponse:
    pipe = state.models.pipeline
    answer = EmbeddingsResponse(loaded={}, skipped={})
    for name in state.embeddings.names():
        try:
            embedding = state.embeddings.read(name)
        except (CheckpointError, OSError):
            continue
        first = next(iter(embedding.vectors.values()))
        item = EmbeddingItem(shape=first.shape[1], vectors=first.shape[0], **embedding.info)
        usable = pipe is not None and pipe.takes_text and fits(embedding, pipe.family, pipe.spec)
        (answer.loaded if usable else answer.skipped)[name] = item
    return answer


def add_addon_routes(app: FastAPI, state: ServerState) -> None:
    """The LoRA and embedding listings and refreshes."""

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem])
    async def loras():
        return _lora_items(state)

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:
        state.loras.refresh()
        return None

    @app.get("/sdapi/v1/embeddings", response_model=EmbeddingsResponse)
    async def embeddings():
        return _embeddings(state)

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings() -> None:
        state.embeddings.refresh()
        return None
