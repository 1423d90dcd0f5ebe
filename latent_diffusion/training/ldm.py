"""Stage 2: train the diffusion model in the latent space of a frozen autoencoder (Rombach et al. 2022, eq. 2).

Read top to bottom: build the model, resume, then per step draw (t, noise, condition dropout)
from per-sample generators, noise the latents, predict eps / v / x0, weight by min-SNR if asked,
step AdamW, update the EMA, log, sample, checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from latent_diffusion.config import BERTTextConfig, ConfigError
from latent_diffusion.diffusion.schedules import alphas_cumprod_for
from latent_diffusion.training import checkpointing, resume
from latent_diffusion.training.config import ExperimentConfig, to_plain, validate_experiment
from latent_diffusion.training.data import ImageFolderDataset, ShardedBatches, make_loader, scan_image_folder
from latent_diffusion.training.distributed import DistributedContext, setup_distributed, teardown_distributed
from latent_diffusion.training.distributed import all_reduce_mean
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.latents import LatentCacheDataset, collate_cache, encode_latents
from latent_diffusion.training.ldm_model import (
    ConditionedUNet, build_training_model, concat_condition, export_single_file, make_tokenizer, random_masks,
)
from latent_diffusion.training.loop import (
    Progress, adamw, autocast_context, enable_gradient_checkpointing, learning_rate, sample_generator, save_image_grid,
    set_learning_rate,
)
from latent_diffusion.training.metrics import MetricsLogger
from latent_diffusion.training.objective import min_snr_weight, network_input_and_target

log = logging.getLogger(__name__)


def train_ldm(config: ExperimentConfig, trainer_class: type[LDMTrainer] | None = None) -> Path:
    """Run stage 2 (or another ``trainer_class`` on its machinery) to ``run.max_steps``, resuming when a
    checkpoint exists; returns the file the run writes (the single-file checkpoint)."""
    validate_experiment(config)
    return run_trainer(trainer_class or LDMTrainer, config)


def run_trainer(trainer_class: type[LDMTrainer], config: ExperimentConfig) -> Path:
    """Build ``trainer_class`` on this process's device, step it to ``run.max_steps`` and return its result file."""
    context = setup_distributed(config.run.device)
    try:
        trainer = trainer_class(config, context)
        for step in range(trainer.start_step, config.run.max_steps):
            trainer.train_step(step)
        return trainer.finish()
    finally:
        teardown_distributed()


def _condition_inputs(settings, tokenizer, batch: dict, generators, device) -> tuple[torch.Tensor | None, list[bool]]:
    """Token ids or labels for the condition encoder, with per-sample dropout to the empty condition."""
    drop = [torch.rand((), generator=g).item() < settings.conditioner.drop_prob for g in generators]
    if tokenizer is not None:
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        return tokenizer(captions).to(device), drop
    if settings.task == "class":
        labels = batch["label"].clone()
        labels[torch.tensor(drop, dtype=torch.bool)] = settings.conditioner.n_classes
        return labels.to(device), drop
    return None, drop


def _dataset(config: ExperimentConfig) -> tuple[torch.utils.data.Dataset, object]:
    """The training items (images, or rows of a latent cache) and their collate function (None: the default)."""
    settings = config.ldm
    if settings.latent_cache and settings.task in ("superres", "inpainting"):
        raise ConfigError(f"ldm.latent_cache: task {settings.task!r} needs the images; train without a cache")
    if settings.latent_cache:
        return LatentCacheDataset(settings.latent_cache), collate_cache
    records, _ = scan_image_folder(config.data)
    return ImageFolderDataset(records, config.data, config.run.seed), None


@dataclasses.dataclass
class _NoisedBatch:
    """One micro-batch ready for the network: its input, timesteps, conditions and regression target."""

    model_input: torch.Tensor
    t: torch.Tensor
    condition: torch.Tensor | None  # token ids or labels when the condition encoder trains
    frozen_context: torch.Tensor | None  # the frozen encoder's output otherwise
    target: torch.Tensor
    alpha_bar: torch.Tensor  # [B], of each sample's timestep
    hint: torch.Tensor | None = None  # the control maps of a ControlNet run


class LDMTrainer:
    """One stage-2 run: the model, optimiser, EMA and data position, advanced one optimiser step at a time."""

    final_name = "model.safetensors"  # the file ``finish`` writes into ``run.out_dir``

    def __init__(self, config: ExperimentConfig, context: DistributedContext) -> None:
        self.config, self.context = config, context
        self.run, self.optim, self.settings = config.run, config.optim, config.ldm
        self.device = context.device
        self.out_dir = Path(self.run.out_dir)
        dataset, collate = self._dataset()
        torch.manual_seed(self.run.seed)
        self._build_model()
        self._record_vocabulary(dataset)
        self.optimizer = adamw(self._param_groups(), self.optim)
        self.ema = EMA(self.network, self.optim.ema_decay) if self.optim.ema_decay > 0 else None
        self.alphas_cumprod = alphas_cumprod_for(self.spec.schedule).to(device=self.device, dtype=torch.float32)
        self.scale_factor = self._initial_scale_factor()
        self.start_step, rng = self._resume()
        self.wrapped = DistributedDataParallel(self.network) if context.enabled else self.network
        self._open_data(dataset, collate)
        self.logger = MetricsLogger(self.out_dir, context.is_main)
        self.progress = Progress(self.run.progress and context.is_main, self.start_step, self.run.max_steps)
        if context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_plain(config), indent=2))
        if rng is not None:
            # Last: opening the data loader draws from the global generator, which dropout then uses.
            checkpointing.restore_rng_states(rng)

    def _dataset(self) -> tuple[torch.utils.data.Dataset, object]:
        return _dataset(self.config)

    def _initial_scale_factor(self) -> float | None:
        """The configured latent scale, else a fine-tuned checkpoint's, else None (estimated from the first batch)."""
        init_scale = self.spec.scale_factor if self.settings.init_checkpoint else None
        return self.settings.scale_factor if self.settings.scale_factor is not None else init_scale

    def _build_model(self) -> None:
        """The LatentDiffusion model with its first stage (and a pre-trained condition encoder) frozen."""
        model, encoder_trains = self._training_model()
        model.to(self.device)
        self.model, self.spec, self.encoder_trains = model, model.spec, encoder_trains
        self.first_stage = model.first_stage_model.eval().requires_grad_(False)
        if model.cond_stage_model is not None and not encoder_trains:
            model.cond_stage_model.eval().requires_grad_(False)
        self.network = self._network(model, encoder_trains)
        if self.optim.gradient_checkpointing:
            enable_gradient_checkpointing([*model.unet.input_blocks, model.unet.middle_block, *model.unet.output_blocks])
        self.tokenizer = make_tokenizer(self.spec)
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]

    def _record_vocabulary(self, dataset) -> None:
        """State in the spec (so in the exported file) the words of the captions a from-scratch text
        encoder trains on: inference then names the words of a prompt the model never saw."""
        text = self.spec.conditioner
        if self.settings.init_checkpoint or not isinstance(text, BERTTextConfig):
            return
        from latent_diffusion.families.custom import caption_words

        captions = dataset.captions if isinstance(dataset, LatentCacheDataset) else [r.caption for r in dataset.records]
        words = tuple(sorted(caption_words(captions)))
        self.spec = dataclasses.replace(self.spec, conditioner=dataclasses.replace(text, vocabulary=words))
        self.model.spec = self.spec

    def _training_model(self):
        """(the LatentDiffusion model, whether its condition encoder trains)."""
        model, encoder_trains = build_training_model(self.config)
        if encoder_trains and hasattr(model.cond_stage_model, "transformer"):
            # The BERTEmbedder's language-model head is never used for conditioning; DDP wants every trained weight used.
            model.cond_stage_model.transformer.to_logits.requires_grad_(False)
        return model, encoder_trains

    def _network(self, model, encoder_trains: bool) -> torch.nn.Module:
        """The module that is trained: the one the optimiser, EMA and DDP see."""
        return ConditionedUNet(model.unet, model.cond_stage_model if encoder_trains else None)

    def _saved_network(self) -> torch.nn.Module:
        """The part of the network that checkpoints hold (all of it: every weight trains)."""
        return self.network

    def _param_groups(self) -> list:
        """The trained parameters, split in two groups when the condition encoder has its own rate."""
        scale = self.settings.conditioner.lr_scale
        if not self.encoder_trains or scale == 1.0:
            return self.trainable
        in_encoder = {id(p) for p in self.network.encoder.parameters()}
        return [{"params": [p for p in self.trainable if id(p) not in in_encoder], "lr_scale": 1.0},
                {"params": [p for p in self.trainable if id(p) in in_encoder], "lr_scale": scale}]

    def _resume(self) -> tuple[int, dict | None]:
        """Restore the newest checkpoint of ``run.out_dir`` (when resuming): the step to continue from and
        the RNG states, which the caller restores once nothing else draws from them before the first step."""
        found = resume.open_checkpoint(self.config, {"network": self._saved_network()}, (self.final_name,),
                                       self.context.is_main)
        if found is None:
            return 0, None
        state, path = found
        self._saved_network().load_state_dict(state["network"])
        resume.load_optimizer_state(self.optimizer, state["optimizer"], "optimizer", path)
        self.ema = resume.restore_ema(self.ema, state["ema"], self.network)
        self.scale_factor = float(state["scale_factor"])
        return int(state["step"]), state["rng"]

    def _open_data(self, dataset, collate) -> None:
        """This rank's stream of micro-batches from ``start_step`` on."""
        context = self.context
        self.sampler = ShardedBatches(len(dataset), self.run.batch_size, grad_accum=self.optim.grad_accum,
                                      rank=context.rank, world_size=context.world_size, seed=self.run.seed,
                                      start_step=self.start_step)
        self.loader = iter(self._loader(dataset, collate))

    def _loader(self, dataset, collate) -> torch.utils.data.DataLoader:
        if collate is None:
            return make_loader(dataset, self.sampler, self.config.data.num_workers)
        return torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate)

    def train_step(self, step: int) -> None:
        """One optimiser step over ``optim.grad_accum`` micro-batches, then logs, samples and checkpoints."""
        started = time.perf_counter()
        lr = learning_rate(step, self.optim, self.run.max_steps)
        set_learning_rate(self.optimizer, lr)
        total = torch.zeros((), device=self.device)
        for accumulation in range(self.optim.grad_accum):
            batch = next(self.loader)
            offset = self.sampler.sample_offset(accumulation)
            generators = [sample_generator(self.run.seed, step, offset + i) for i in range(len(batch["caption"]))]
            noised = self._noised_batch(batch, generators)
            sync = accumulation == self.optim.grad_accum - 1 or not self.context.enabled
            loss = self._loss(noised, sync)
            (loss / self.optim.grad_accum).backward()
            total += loss.detach() / self.optim.grad_accum
        grad_norm = self._optimizer_step()
        self._after_step(step + 1, lr, total, grad_norm, batch, time.perf_counter() - started)

    @torch.no_grad()
    def _noised_batch(self, batch: dict, generators: list[torch.Generator]) -> _NoisedBatch:
        """Latents noised to random timesteps, with their conditions and the network's target."""
        # Each sample's generator is drawn in a fixed order: latent noise, mask, condition dropout, t, eps.
        images = batch["image"].to(self.device) if "image" in batch else None
        z = self._scaled_latents(batch, images, generators)
        concat = None
        if images is not None:
            masks = random_masks(generators, images.shape[-1]).to(self.device) if self.settings.task == "inpainting" else None
            concat = concat_condition(self.settings.task, images, masks, tuple(z.shape[-2:]),
                                      lambda x: encode_latents(self.first_stage, x, None) * self.scale_factor)
        condition, _dropped = _condition_inputs(self.settings, self.tokenizer, batch, generators, self.device)
        frozen_context = None
        if condition is not None and not self.encoder_trains:
            frozen_context = self.model.cond_stage_model(condition)
            condition = None
        t = torch.cat([torch.randint(0, self.spec.schedule.timesteps, (1,), generator=g) for g in generators]).to(self.device)
        eps = torch.cat([torch.randn((1, *z.shape[1:]), generator=g) for g in generators]).to(self.device)
        alpha_bar = self.alphas_cumprod[t]
        x_t, target = network_input_and_target(self.spec.prediction, z, eps, alpha_bar)
        model_input = torch.cat([x_t, concat], dim=1) if concat is not None else x_t
        return _NoisedBatch(model_input, t, condition, frozen_context, target, alpha_bar)

    def _scaled_latents(self, batch: dict, images: torch.Tensor | None, generators: list[torch.Generator]) -> torch.Tensor:
        """Latents times the scale factor (estimated from this batch when none is known yet)."""
        if images is None:
            mean, std = batch["moments"].to(self.device).chunk(2, dim=1)
            noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
            z = mean + std * noise.to(self.device)
        else:
            z = encode_latents(self.first_stage, images, generators)
        if self.scale_factor is None:
            # Rescale latents to unit variance, estimated from the first global batch (Rombach et al. 4.3.2).
            moments = all_reduce_mean(torch.stack([z.mean(), z.square().mean()]), self.context)
            self.scale_factor = float(1.0 / (moments[1] - moments[0] ** 2).clamp(min=1e-12).sqrt())
            if self.context.is_main:
                log.info("latent scale factor estimated from the first batch: %.5f", self.scale_factor)
        return z * self.scale_factor

    def _loss(self, noised: _NoisedBatch, sync: bool) -> torch.Tensor:
        """Mean (min-SNR weighted) squared error of the network's prediction; gradients sync only when ``sync``."""
        with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), autocast_context(self.optim.precision, self.device):
            prediction = self._predict(noised)
            per_sample = F.mse_loss(prediction.float(), noised.target, reduction="none").mean(dim=(1, 2, 3))
            if self.settings.min_snr_gamma is not None:
                snr = noised.alpha_bar / (1 - noised.alpha_bar)
                per_sample = per_sample * min_snr_weight(snr, self.settings.min_snr_gamma, self.spec.prediction)
            return per_sample.mean()

    def _predict(self, noised: _NoisedBatch) -> torch.Tensor:
        return self.wrapped(noised.model_input, noised.t.float(), noised.condition, noised.frozen_context)

    def _optimizer_step(self) -> torch.Tensor | None:
        """Clip, step AdamW, update the EMA; the gradient norm before clipping (None without clipping)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.optim.grad_clip) if self.optim.grad_clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.network)
        return grad_norm

    def _after_step(self, done: int, lr: float, total: torch.Tensor, grad_norm, batch: dict, elapsed: float) -> None:
        """Progress, metrics, sample grids and checkpoints due after ``done`` steps."""
        run = self.run
        images_per_second = run.batch_size / max(elapsed, 1e-9)
        loss_value = all_reduce_mean(total, self.context).item()
        self.progress.update(loss_value, images_per_second)
        if run.log_every and done % run.log_every == 0:
            values = {"train/loss": loss_value, "train/lr": lr, "train/images_per_second": images_per_second}
            if grad_norm is not None:
                values["train/grad_norm"] = float(grad_norm)
            self.logger.log(done, values)
        if self.context.is_main and run.sample_every and done % run.sample_every == 0:
            _save_samples(self.model, self.network, self.ema, self.spec, self.scale_factor, batch, self.settings,
                          self.out_dir / "samples" / f"step-{done:08d}.png", run)
        if self.context.is_main and (done % run.checkpoint_every == 0 or done == run.max_steps):
            checkpointing.save_training_state(self.out_dir, done, {
                "network": self._saved_network().state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "scale_factor": self.scale_factor,
                "config": to_plain(self.config),
            }, run.keep_last)

    def finish(self) -> Path:
        """Close the logs and write the single-file checkpoint (EMA weights beside the trained ones)."""
        self.progress.close()
        self.logger.close()
        final = self.out_dir / self.final_name
        if self.context.is_main:
            self._export(final)
        return final

    def _export(self, final: Path) -> None:
        """Write the run's result to ``final``."""
        ema = self.ema
        self.model.spec = dataclasses.replace(self.spec, scale_factor=self.scale_factor)
        export_single_file(self.model, ema.shadow if ema is not None else None,
                           (ema.decay, ema.num_updates) if ema is not None else (0.0, 0), final,
                           carry_from=self.settings.init_checkpoint)


def _save_samples(model, network, ema, spec, scale_factor, batch, settings, path: Path, run) -> None:
    """A PNG grid of EMA samples for the last batch's conditions (DDIM, classifier-free guidance)."""
    try:
        from latent_diffusion.training.sampling import generate
    except ImportError as error:  # the diffusion samplers are a separate package part
        log.warning("no sample grid: %s", error)
        return
    count = min(run.num_samples, len(batch["caption"]))
    images = generate(model, network, ema, spec, scale_factor, settings, captions=batch["caption"][:count],
                      labels=batch["label"][:count], images=batch.get("image", None), seed=run.seed)
    save_image_grid(images, path)
