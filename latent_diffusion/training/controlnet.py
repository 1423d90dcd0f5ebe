"""Train a ControlNet (Zhang et al. 2023) beside a frozen text-to-image model: ``stage: controlnet``.

The ControlNet starts as a copy of the base UNet's encoder (time embedding, input blocks, middle
block) with its zero convolutions and the hint encoder's last convolution at zero, so the
controlled UNet first predicts exactly what the base does. Only the ControlNet trains; the base
model (UNet, autoencoder, text encoder) is frozen. Each step is the base run's (same noise, timesteps,
caption dropout from ``ldm.conditioner.drop_prob``, objective and min-SNR weighting from the base model
and ``ldm``) with the ControlNet's residuals added to the UNet, the control map made from the
training image by the configured preprocessor. Checkpoints, resuming and the EMA are the stage-2
run's; the result is a ControlNet file in the original ``control_model.*`` layout.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from latent_diffusion.config import ConfigError, ModelSpec
from latent_diffusion.models.controlnet import HINT_WIDTHS, ControlNet, controlnet_config_for
from latent_diffusion.training.config import ControlNetSettings, ExperimentConfig, validate_experiment
from latent_diffusion.training.control_maps import ControlMapDataset, collate_with_hints, map_maker
from latent_diffusion.training.data import ImageFolderDataset, make_loader, scan_image_folder
from latent_diffusion.training.ldm import LDMTrainer, _NoisedBatch, run_trainer
from latent_diffusion.training.ldm_model import make_tokenizer
from latent_diffusion.training.loop import enable_gradient_checkpointing

log = logging.getLogger(__name__)

BUILTIN = "builtin"


def train_controlnet(config: ExperimentConfig) -> Path:
    """Run a ControlNet training to ``run.max_steps`` (resuming when a checkpoint exists); returns the ControlNet file."""
    validate_controlnet_experiment(config)
    return run_trainer(ControlNetTrainer, config)


def base_model_path(settings: ControlNetSettings) -> Path:
    """The file of ``controlnet.base_model`` ("builtin": the shipped shapes model)."""
    name = settings.base_model
    if not name:
        raise ConfigError("controlnet.base_model: set the model the ControlNet steers (a single file, "
                          f"or {BUILTIN!r} for the built-in shapes model)")
    if name == BUILTIN:
        from latent_diffusion.pipelines.common import default_checkpoint_path

        try:
            return default_checkpoint_path()
        except FileNotFoundError as error:
            raise ConfigError(f"controlnet.base_model={BUILTIN}: {error}") from None
    if not Path(name).is_file():
        raise ConfigError(f"controlnet.base_model: {name} is not a file")
    return Path(name)


def validate_controlnet_experiment(config: ExperimentConfig) -> None:
    """Checks that need no model: the stage-2 settings a ControlNet run cannot honour are errors, not ignored."""
    validate_experiment(config)
    ldm = config.ldm
    unused = {"ldm.first_stage": ldm.first_stage, "ldm.init_checkpoint": ldm.init_checkpoint,
              "ldm.scale_factor": ldm.scale_factor}
    for key, value in unused.items():
        if value:
            raise ConfigError(f"{key}: a ControlNet run takes the model, its autoencoder and latent scale from "
                              f"controlnet.base_model; remove {key}")
    if ldm.latent_cache:
        raise ConfigError("ldm.latent_cache: a ControlNet run makes its control maps from the images; train without a cache")
    if config.run.sample_every:
        raise ConfigError("run.sample_every: a ControlNet run makes no sample grids (set it to 0); try the result "
                          "with ldm txt2img --control FILE:MAP")
    if not 0.0 <= ldm.conditioner.drop_prob < 1.0:
        raise ConfigError(f"ldm.conditioner.drop_prob must lie in [0, 1), got {ldm.conditioner.drop_prob}")
    base_model_path(config.controlnet)
    map_maker(config.controlnet, config.data.size)


def check_base_model(spec: ModelSpec, path: Path) -> None:
    """ConfigError unless ``spec`` is a text-to-image model this stage can steer."""
    if spec.conditioning != "crossattn" or spec.conditioner is None:
        raise ConfigError(f"controlnet.base_model: {path} is a {spec.conditioning!r}-conditioned model; "
                          "a ControlNet is trained beside a text-to-image model")
    if spec.unet.num_classes is not None:
        raise ConfigError(f"controlnet.base_model: {path} takes a class or ADM vector (an SDXL-style UNet); "
                          "training a ControlNet for it is not supported")


def hint_widths_for(settings: ControlNetSettings, spec: ModelSpec) -> tuple[int, ...]:
    """The hint encoder's widths: one halving per halving of the autoencoder, so maps have the image's size."""
    halvings = spec.downsampling_factor.bit_length() - 1
    widths = settings.hint_widths or HINT_WIDTHS[: halvings + 1]
    if len(widths) != halvings + 1:
        raise ConfigError(f"controlnet.hint_widths={list(widths)}: the autoencoder downsamples {spec.downsampling_factor}x, "
                          f"so the hint encoder needs {halvings + 1} widths ({halvings} halvings)")
    if min(widths) < 1:
        raise ConfigError(f"controlnet.hint_widths={list(widths)}: widths must be >= 1")
    return tuple(widths)


def controlnet_from_unet(unet: torch.nn.Module, spec: ModelSpec, settings: ControlNetSettings) -> ControlNet:
    """A ControlNet whose encoder copy holds ``unet``'s weights; zero convolutions and the hint output stay zero."""
    controlnet = ControlNet(controlnet_config_for(spec.unet, hint_widths=hint_widths_for(settings, spec)))
    source = unet.state_dict()
    with torch.no_grad():
        for name, tensor in controlnet.state_dict().items():
            if name in source:
                # An inpainting UNet takes more input channels; the copy sees only the latent's.
                tensor.copy_(source[name][:, : tensor.shape[1]] if name == "input_blocks.0.0.weight" else source[name])
    return controlnet


class ControlNetTrainer(LDMTrainer):
    """A stage-2 run in which ``self.network`` is the ControlNet and the base model only runs."""

    final_name = "controlnet.safetensors"

    def _dataset(self) -> tuple[torch.utils.data.Dataset, object]:
        records, _ = scan_image_folder(self.config.data)
        images = ImageFolderDataset(records, self.config.data, self.config.run.seed)
        return ControlMapDataset(images, map_maker(self.config.controlnet, self.config.data.size)), collate_with_hints

    def _build_model(self) -> None:
        from latent_diffusion.checkpoints.load import load_checkpoint

        path = base_model_path(self.config.controlnet)
        loaded = load_checkpoint(path)
        check_base_model(loaded.spec, path)
        model = loaded.model.to(self.device).eval().requires_grad_(False)
        self.model, self.spec, self.encoder_trains = model, loaded.spec, False
        self.first_stage = model.first_stage_model
        self.network = controlnet_from_unet(model.unet, self.spec, self.config.controlnet).to(self.device)
        if self.optim.gradient_checkpointing:
            # The UNet's encoder sees nothing that needs a gradient; its decoder carries the residuals' gradients.
            unet, control = model.unet, self.network
            enable_gradient_checkpointing([unet.middle_block, *unet.output_blocks, *control.input_blocks,
                                           control.middle_block])
        self.tokenizer = make_tokenizer(self.spec)
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        log.info("ControlNet of %.2f M parameters beside the frozen %s", sum(p.numel() for p in self.trainable) / 1e6, path)

    def _initial_scale_factor(self) -> float:
        return self.spec.scale_factor

    def _record_vocabulary(self, dataset) -> None:
        """Nothing to record: the base model's text encoder is not trained, and its file keeps its own words."""

    def _loader(self, dataset, collate) -> torch.utils.data.DataLoader:
        return make_loader(dataset, self.sampler, self.config.data.num_workers, collate_fn=collate)

    def _noised_batch(self, batch: dict, generators: list[torch.Generator]) -> _NoisedBatch:
        noised = super()._noised_batch(batch, generators)
        noised.hint = batch["hint"].to(self.device)
        return noised

    def _predict(self, noised: _NoisedBatch) -> torch.Tensor:
        t = noised.t.float()
        residuals = self.wrapped(noised.model_input, noised.hint, t, noised.frozen_context)
        return self.model.unet(noised.model_input, t, context=noised.frozen_context, control=residuals)

    def finish(self) -> Path:
        """Close the logs and write the ControlNet (its EMA weights when the run keeps an EMA)."""
        from latent_diffusion.checkpoints.controlnet import save_controlnet

        self.progress.close()
        self.logger.close()
        final = self.out_dir / self.final_name
        if self.context.is_main:
            if self.ema is not None:
                self.ema.copy_to(self.network)
            save_controlnet(self.network, final)
        return final
