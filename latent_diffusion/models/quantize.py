"""Vector quantisation of the VQ autoencoder's latent (van den Oord et al. 2017, VQ-VAE).

Behaves like taming-transformers' ``VectorQuantizer2``, which the latent-diffusion VQ first stages
were trained with: nearest codebook entry, straight-through gradient, commitment weight ``beta``
and optional remapping of code indices to the subset of codes that a trained model actually uses.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

# Distances computed at once in nearest_codes (64 MiB in fp32): a 128x128 latent against a
# 16384-entry codebook would otherwise need a 1 GiB matrix.
DISTANCE_BLOCK_ELEMENTS = 1 << 24


class QuantizerInfo(NamedTuple):
    """Side outputs of quantisation, in the order of the reference's ``info`` tuple."""

    perplexity: torch.Tensor | None
    min_encodings: torch.Tensor | None
    indices: torch.Tensor


class QuantizerOutput(NamedTuple):
    """Quantised latent (straight-through), codebook + commitment loss, and the code indices."""

    z_q: torch.Tensor
    loss: torch.Tensor
    info: QuantizerInfo


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through estimator (taming VectorQuantizer2)."""

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        remap: str | os.PathLike | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        if n_embed <= 0 or embed_dim <= 0:
            raise ValueError(
                f"VectorQuantizer needs n_embed > 0 and embed_dim > 0; got {n_embed}, {embed_dim}"
            )
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        # The reference weighted the wrong term with beta; trained checkpoints expect that ("legacy").
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape

        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

        self.remap = remap
        self.unknown_index: int | str | None = None
        if remap is None:
            self.num_indices = n_embed
        else:
            if not os.path.isfile(remap):
                raise ValueError(f"VectorQuantizer: remap file {str(remap)!r} does not exist")
            used = np.load(remap)
            if used.ndim != 1 or used.size == 0:
                raise ValueError(
                    f"VectorQuantizer: remap file must hold a non-empty 1-D array; got shape {used.shape}"
                )
            # Persistent, as in the reference: the used-code table is part of a remapped checkpoint.
            self.register_buffer("used", torch.as_tensor(used, dtype=torch.long))
            self.num_indices = len(used)
            if unknown_index == "extra":
                # Codes outside the used set get one extra index of their own.
                self.unknown_index = self.num_indices
                self.num_indices += 1
            elif unknown_index == "random" or isinstance(unknown_index, int):
                self.unknown_index = unknown_index
            else:
                raise ValueError(
                    "VectorQuantizer: unknown_index must be 'random', 'extra' or an int; "
                    f"got {unknown_index!r}"
                )

    def remap_to_used(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> positions in the used-code table (unknown codes per ``unknown_index``)."""
        flat = indices.reshape(indices.shape[0], -1)
        matches = flat.unsqueeze(-1) == self.used.to(flat)
        remapped = matches.long().argmax(-1)
        unknown = ~matches.any(-1)
        if self.unknown_index == "random":
            remapped[unknown] = torch.randint(
                0, self.num_indices, (int(unknown.sum()),), device=remapped.device
            )
        else:
            remapped[unknown] = self.unknown_index
        return remapped.reshape(indices.shape)

    def unmap_to_all(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions in the used-code table -> codebook indices; the 'extra' index maps to used[0]."""
        used = self.used.to(indices)
        # As the reference: an out-of-table ('extra') position falls back to the first used code.
        return used[torch.where(indices < len(used), indices, 0)]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` of shape (B, embed_dim, H, W) to its nearest codebook entries."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"VectorQuantizer expects (batch, {self.embed_dim}, height, width); got {tuple(z.shape)}"
            )
        batch, _, height, width = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        indices = self.nearest_codes(z_flat)
        z_q_flat = self.embedding(indices)

        # Codebook term pulls codes to the encoder output; commitment term the other way round.
        codebook_term = torch.mean((z_q_flat - z_flat.detach()) ** 2)
        commitment_term = torch.mean((z_q_flat.detach() - z_flat) ** 2)
        if self.legacy:
            loss = commitment_term + self.beta * codebook_term
        else:
            loss = self.beta * commitment_term + codebook_term

        # Contiguous NCHW, so that the decoder's convolutions do not inherit a channels-last layout.
        z_q = z_q_flat.view(batch, height, width, self.embed_dim).permute(0, 3, 1, 2).contiguous()
        # Straight-through: forward value of the code, gradient of the identity.
        z_q = z + (z_q - z).detach()

        if self.remap is not None:
            indices = self.remap_to_used(indices.view(batch, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(batch, height, width)
        return QuantizerOutput(z_q, loss, QuantizerInfo(None, None, indices))

    def nearest_codes(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector (Euclidean) for each row of ``z_flat``."""
        codebook = self.embedding.weight
        code_norms = codebook.square().sum(1)
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e; |z|^2 is the same for every code, so argmin needs only
        # the rest. Rows go in blocks so that the distance matrix stays small for big latents.
        rows_per_block = max(1, DISTANCE_BLOCK_ELEMENTS // codebook.shape[0])
        blocks = z_flat.split(rows_per_block)
        return torch.cat([torch.addmm(code_norms, block, codebook.t(), alpha=-2.0).argmin(1) for block in blocks])

    def get_codebook_entry(
        self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None
    ) -> torch.Tensor:
        """Code vectors for ``indices``; with ``shape`` = (B, H, W, C) returned as (B, C, H, W)."""
        if self.remap is not None:
            if shape is None:
                raise ValueError(
                    "get_codebook_entry with remapped indices needs shape=(batch, height, width, channels)"
                )
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
