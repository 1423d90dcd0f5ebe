"""SDXL's conditioner: a list of embedders under ``conditioner.embedders.N``, as the released files store it.

The text encoders come first (CLIP ViT-L and OpenCLIP ViT-bigG for the base model, bigG alone for
the refiner); their state-dict keys are those of :class:`~.text_encoders.CLIPTextEncoder`. The
numbers SDXL conditions on (image sizes, crop, aesthetic score) follow as embedders without
parameters. Tokenising and prompt syntax live in the pipelines; this module only turns encoder
outputs and numbers into the UNet's two inputs.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from latent_diffusion.config import MICRO_CONDITIONS, GeneralConditionerConfig
from latent_diffusion.models.text_encoders import CLIPTextEncoder
from latent_diffusion.nn.layers import timestep_embedding


class FourierEmbedder(nn.Module):
    """Sinusoidal features of each of a row's numbers, concatenated: ``[B, n] -> [B, n * dim]``.

    The timestep embedding applied to pixel sizes and scores (SDXL, Podell et al. 2023, Sec. 2.2).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        batch = values.shape[0]
        return timestep_embedding(values.reshape(-1), self.dim).reshape(batch, -1)


class GeneralConditioner(nn.Module):
    """Text encoders and number embedders in the order of the file's ``embedders`` list."""

    def __init__(self, config: GeneralConditionerConfig):
        super().__init__()
        self.config = config
        self.embedders = nn.ModuleList(
            [CLIPTextEncoder(encoder) for encoder in config.text_encoders]
            + [FourierEmbedder(config.fourier_dim) for _ in config.micro_conditions]
        )

    @property
    def text_encoders(self) -> list[CLIPTextEncoder]:
        return list(self.embedders)[: len(self.config.text_encoders)]

    def vector(self, pooled: torch.Tensor, numbers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ADM input ``[B, vector_dim]``: the pooled text features, then each number's features.

        ``numbers`` maps each of ``config.micro_conditions`` to a ``[B, k]`` tensor (k values: 2 for
        a size as (height, width) or a crop as (top, left), 1 for the aesthetic score).
        """
        parts = [pooled]
        number_embedders = list(self.embedders)[len(self.config.text_encoders):]
        for name, embedder in zip(self.config.micro_conditions, number_embedders):
            values = numbers[name]
            if values.shape != (pooled.shape[0], MICRO_CONDITIONS[name]):
                raise ValueError(f"{name}: expected {MICRO_CONDITIONS[name]} value(s) per image for a batch of "
                                 f"{pooled.shape[0]}, got shape {tuple(values.shape)}")
            parts.append(embedder(values.to(pooled.device)).to(pooled.dtype))
        return torch.cat(parts, dim=1)
