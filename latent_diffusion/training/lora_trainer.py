"""``stage: lora``: stage-2 training of LoRA factors beside a loaded model whose own weights stay frozen.

Everything else is the stage-2 run's (data, latent cache, noise, loss, EMA, resume): only the
trained module (the frozen UNet with the adapters hooked on), what checkpoints hold (the factors)
and the result (a kohya-format LoRA file, ``lora.safetensors``) differ.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from latent_diffusion.training.config import ExperimentConfig
from latent_diffusion.training.ldm import LDMTrainer, train_ldm
from latent_diffusion.training.ldm_model import ConditionedUNet, build_training_model
from latent_diffusion.training.lora import LoraNetwork, attach_lora
from latent_diffusion.training.lora_writer import kohya_metadata, write_kohya_lora


def train_lora(config: ExperimentConfig) -> Path:
    """Train to ``run.max_steps`` (resuming when a checkpoint exists); returns the LoRA file."""
    return train_ldm(config, LoraTrainer)


class LoraUNet(ConditionedUNet):
    """The frozen UNet (and text encoder, when its layers are adapted) with the adapters as a child."""

    def __init__(self, unet: nn.Module, encoder: nn.Module | None, lora: LoraNetwork) -> None:
        super().__init__(unet, encoder)
        self.lora = lora


class LoraTrainer(LDMTrainer):
    """One LoRA run: :class:`LDMTrainer` with the adapters as the only trained weights."""

    final_name = "lora.safetensors"

    def _training_model(self):
        model, _ = build_training_model(self.config)
        self.lora = attach_lora(model, self.config.lora)
        return model, bool(self.config.lora.text_targets)

    def _network(self, model, encoder_trains: bool) -> nn.Module:
        self.lora.to(self.device)
        return LoraUNet(model.unet, model.cond_stage_model if encoder_trains else None, self.lora)

    def _saved_network(self) -> nn.Module:
        return self.lora

    def _param_groups(self) -> list:
        return self.trainable

    def factors(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.lora_down.weight": ..., "<layer>.lora_up.weight": ...}``: the EMA's average when
        the run keeps one (as the samples and the stage-2 file use), else the trained factors."""
        if self.ema is None:
            return dict(self.lora.layers.state_dict())
        prefix = "lora.layers."
        return {name[len(prefix):]: value for name, value in self.ema.shadow.items() if name.startswith(prefix)}

    def _export(self, final: Path) -> None:
        settings = self.config.lora
        alphas = {name: adapter.alpha for name, adapter in self.lora.layers.items()}
        metadata = kohya_metadata(self.spec.family, settings.rank, settings.alpha, self.run.max_steps)
        write_kohya_lora(final, self.factors(), alphas, metadata)
