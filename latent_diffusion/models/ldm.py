"""The latent diffusion model as its checkpoints store it: three networks under their original names.

A CompVis / Stable Diffusion single file keeps the denoiser under ``model.diffusion_model.``, the
autoencoder under ``first_stage_model.`` and the condition encoder under ``cond_stage_model.``
(SDXL: its list of embedders under ``conditioner.``).
:class:`LatentDiffusion` has exactly that module tree, so its ``state_dict()`` keys are the file's
network keys and a file loads with ``strict=True``. It holds structure only; the diffusion maths,
sampling, training and file handling live in their own modules.
"""
from __future__ import annotations

from torch import nn

from latent_diffusion.config import GeneralConditionerConfig, ModelSpec
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
from latent_diffusion.models.text_encoders import build_condition_encoder
from latent_diffusion.models.unet import UNetModel


class DiffusionModelSlot(nn.Module):
    """Keeps the UNet at ``model.diffusion_model`` (CompVis wraps it in a ``DiffusionWrapper``)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


def build_first_stage(spec: ModelSpec) -> AutoencoderKL | VQModel:
    """The spec's autoencoder: KL-regularised (SD) or vector-quantised (the LDM paper's VQ-f4/f8)."""
    return AutoencoderKL(spec.autoencoder) if spec.autoencoder.kind == "kl" else VQModel(spec.autoencoder)


class LatentDiffusion(nn.Module):
    """UNet, first stage and condition encoder of one model, with the checkpoint's key layout."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = DiffusionModelSlot(UNetModel(spec.unet))
        self.first_stage_model = build_first_stage(spec)
        encoder = build_condition_encoder(spec.conditioner)
        if isinstance(spec.conditioner, GeneralConditionerConfig):
            self.conditioner = encoder
        else:
            # None for unconditional and image-concatenation models (LDM inpainting re-uses the first stage).
            self.cond_stage_model = encoder

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def autoencoder(self) -> AutoencoderKL | VQModel:
        return self.first_stage_model

    @property
    def condition_encoder(self) -> nn.Module | None:
        """``cond_stage_model`` (SD, CompVis) or ``conditioner`` (SDXL), wherever the file keeps it."""
        return self.conditioner if hasattr(self, "conditioner") else self.cond_stage_model

    def component_parameter_counts(self) -> dict[str, int]:
        """Parameters per network: ``unet``, ``vae``, ``cond`` (0 when there is no condition encoder)."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        return {"unet": count(self.unet), "vae": count(self.first_stage_model), "cond": count(self.condition_encoder)}
