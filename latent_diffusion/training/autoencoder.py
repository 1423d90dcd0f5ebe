"""Stage 1: train the perceptual-compression autoencoder (KL or VQ) on a folder of images.

The loss is the taming / CompVis ``LPIPSWithDiscriminator`` objective divided by the number of
pixel values, so reconstruction terms are per-pixel means and ``kl_weight`` keeps the meaning it
has in the CompVis configs: L1 + perceptual + KL (or codebook) + an adaptively weighted PatchGAN
hinge term that starts at ``loss.disc_start``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from latent_diffusion.config import ConfigError
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
from latent_diffusion.training import checkpointing, resume
from latent_diffusion.training.config import ExperimentConfig, to_plain, validate_experiment
from latent_diffusion.training.data import ImageFolderDataset, ShardedBatches, make_loader, scan_image_folder, split_validation
from latent_diffusion.training.distributed import DistributedContext, all_reduce_mean, setup_distributed, teardown_distributed
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.losses.discriminator import PatchDiscriminator, adaptive_generator_weight, hinge_discriminator_loss
from latent_diffusion.training.losses.lpips import build_perceptual_loss
from latent_diffusion.training.loop import (
    Progress, adamw, autocast_context, enable_gradient_checkpointing, learning_rate, sample_generator, save_image_grid,
    set_learning_rate,
)
from latent_diffusion.training.metrics import InceptionFeatures, MetricsLogger, psnr, ssim

log = logging.getLogger(__name__)

AUTOENCODER_METADATA_KEY = "latent_diffusion.autoencoder_config"


def build_autoencoder(config: ExperimentConfig) -> AutoencoderKL | VQModel:
    ae = config.autoencoder
    if config.data.size % ae.downsampling_factor:
        raise ConfigError(f"data.size={config.data.size} must be a multiple of the downsampling factor {ae.downsampling_factor}")
    return AutoencoderKL(ae) if ae.kind == "kl" else VQModel(ae)


def encode_decode(model, images: torch.Tensor, generators: list[torch.Generator]):
    """(reconstruction, regulariser loss per pixel-mean scale, extra logs) for one micro-batch."""
    if isinstance(model, AutoencoderKL):
        posterior = model.encode(images)
        noise = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=g) for g in generators]).to(images.device)
        reconstruction = model.decode(posterior.mean + posterior.std * noise)
        kl = posterior.kl().mean() / images[0].numel()
        return reconstruction, kl, {"kl": kl.detach()}
    quantized = model.quantize(model.encode(images))
    reconstruction = model.decoder(model.post_quant_conv(quantized.z_q))
    counts = torch.bincount(quantized.info.indices.flatten(), minlength=model.config.n_embed).float()
    probabilities = counts / counts.sum()
    perplexity = torch.exp(-(probabilities * torch.log(probabilities + 1e-10)).sum())
    usage = (counts > 0).float().mean()
    return reconstruction, quantized.loss, {"codebook_loss": quantized.loss.detach(), "perplexity": perplexity,
                                            "codebook_usage": usage}


@torch.no_grad()
def init_logvar(model: AutoencoderKL, value: float) -> None:
    """Make ``quant_conv``'s log-variance half output ``value`` everywhere (the mean half is untouched)."""
    half = model.quant_conv.out_channels // 2
    model.quant_conv.weight[half:].zero_()
    model.quant_conv.bias[half:].fill_(value)


def save_autoencoder(model: AutoencoderKL | VQModel, path: Path) -> None:
    """The trained first stage as ``.safetensors`` (CompVis keys) with its config in the metadata."""
    from latent_diffusion.checkpoints.io import save_safetensors

    metadata = {AUTOENCODER_METADATA_KEY: json.dumps(to_plain(model.config))}
    save_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, metadata)


@torch.no_grad()
def validate(model, records, config: ExperimentConfig, device, inception: InceptionFeatures | None) -> dict[str, float]:
    """PSNR, SSIM (and rFID with Inception weights) of reconstructions of the held-out images."""
    dataset = ImageFolderDataset(records, config.data, config.run.seed, augment=False)
    model.eval()
    psnrs, ssims, real_features, fake_features = [], [], [], []
    for start in range(0, len(dataset), 8):
        images = torch.stack([dataset[(0, i)]["image"] for i in range(start, min(start + 8, len(dataset)))]).to(device)
        if isinstance(model, AutoencoderKL):
            reconstruction = model.decode(model.encode(images).mode())
        else:
            reconstruction = model.decode(model.encode(images))
        real01, fake01 = (images + 1) / 2, (reconstruction.clamp(-1, 1) + 1) / 2
        psnrs.append(psnr(fake01, real01))
        ssims.append(ssim(fake01, real01, reduce=False))
        if inception is not None:
            real_features.append(inception(images))
            fake_features.append(inception(reconstruction))
    model.train()
    metrics = {"val/psnr": torch.cat(psnrs).mean().item(), "val/ssim": torch.cat(ssims).mean().item()}
    if inception is not None:
        from latent_diffusion.evaluation.frechet import frechet_distance

        metrics["val/rfid"] = frechet_distance(torch.cat(real_features), torch.cat(fake_features))
    return metrics


def train_autoencoder(config: ExperimentConfig) -> Path:
    """Run stage 1 to ``run.max_steps`` (resuming when a checkpoint exists); returns the saved weights' path."""
    validate_experiment(config)
    context = setup_distributed(config.run.device)
    try:
        trainer = AutoencoderTrainer(config, context)
        for step in range(trainer.start_step, config.run.max_steps):
            trainer.train_step(step)
        return trainer.finish()
    finally:
        teardown_distributed()


class AutoencoderTrainer:
    """One stage-1 run: autoencoder, discriminator, their optimisers, EMA and data position."""

    def __init__(self, config: ExperimentConfig, context: DistributedContext) -> None:
        self.config, self.context = config, context
        self.run, self.optim, self.loss_cfg = config.run, config.optim, config.loss
        self.device = context.device
        self.out_dir = Path(self.run.out_dir)
        records, _classes = scan_image_folder(config.data)
        self.train_records, self.val_records = split_validation(records, config.data, self.run.seed)
        torch.manual_seed(self.run.seed)  # identical initial weights on every rank
        self._build_networks()
        self.opt_g = adamw(self.model.parameters(), self.optim)
        self.opt_d = adamw(self.discriminator.parameters(), self.optim, lr=self.loss_cfg.disc_lr or self.optim.lr)
        self.ema = EMA(self.model, self.optim.ema_decay) if self.optim.ema_decay > 0 else None
        self.inception = InceptionFeatures(self.run.inception_weights, self.device) if self.run.inception_weights else None
        self.start_step, rng = self._resume()
        self.generator = DistributedDataParallel(self.model) if context.enabled else self.model
        self.disc_ddp = DistributedDataParallel(self.discriminator) if context.enabled else self.discriminator
        self.sampler = ShardedBatches(len(self.train_records), self.run.batch_size, grad_accum=self.optim.grad_accum,
                                      rank=context.rank, world_size=context.world_size, seed=self.run.seed,
                                      start_step=self.start_step)
        dataset = ImageFolderDataset(self.train_records, config.data, self.run.seed)
        self.loader = iter(make_loader(dataset, self.sampler, config.data.num_workers))
        self.logger = MetricsLogger(self.out_dir, context.is_main)
        self.progress = Progress(self.run.progress and context.is_main, self.start_step, self.run.max_steps)
        if context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_plain(config), indent=2))
        self.last_layer = self.model.get_last_layer()
        if rng is not None:
            # Last: opening the data loader draws from the global generator, which dropout then uses.
            checkpointing.restore_rng_states(rng)

    def _build_networks(self) -> None:
        """The autoencoder, the PatchGAN discriminator and the perceptual loss network."""
        loss_cfg, device = self.loss_cfg, self.device
        self.model = build_autoencoder(self.config).to(device)
        if loss_cfg.logvar_init is not None and isinstance(self.model, AutoencoderKL):
            init_logvar(self.model, loss_cfg.logvar_init)
        discriminator = PatchDiscriminator(self.config.autoencoder.out_ch, loss_cfg.disc_channels, loss_cfg.disc_layers)
        discriminator = discriminator.to(device)
        if self.context.enabled and device.type == "cuda":
            # Batch statistics over the global batch, as one process would see them. SyncBatchNorm has no
            # CPU kernel, so under gloo each rank normalises its own share (as CompVis' multi-GPU runs did).
            # Converted before the optimiser and any resumed state see the parameters; the keys stay the same.
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        self.discriminator = discriminator
        self.perceptual = build_perceptual_loss(loss_cfg.lpips_weights, loss_cfg.vgg_weights).to(device)
        if self.optim.gradient_checkpointing:
            model = self.model
            enable_gradient_checkpointing([*model.encoder.down, model.encoder.mid, model.decoder.mid, *model.decoder.up])

    def _resume(self) -> tuple[int, dict | None]:
        """Restore the newest checkpoint of ``run.out_dir`` (when resuming): the step to continue from and
        the RNG states, which the caller restores once nothing else draws from them before the first step."""
        networks = {"model": self.model, "discriminator": self.discriminator}
        found = resume.open_checkpoint(self.config, networks, ("autoencoder.safetensors",), self.context.is_main)
        if found is None:
            return 0, None
        state, path = found
        self.model.load_state_dict(state["model"])
        self.discriminator.load_state_dict(state["discriminator"])
        resume.load_optimizer_state(self.opt_g, state["opt_g"], "autoencoder optimiser", path)
        resume.load_optimizer_state(self.opt_d, state["opt_d"], "discriminator optimiser", path)
        self.ema = resume.restore_ema(self.ema, state["ema"], self.model)
        return int(state["step"]), state["rng"]

    def train_step(self, step: int) -> None:
        """Generator step over ``optim.grad_accum`` micro-batches, then the discriminator's, logs and checkpoints."""
        started = time.perf_counter()
        optim, loss_cfg = self.optim, self.loss_cfg
        lr = learning_rate(step, optim, self.run.max_steps)
        set_learning_rate(self.opt_g, lr)
        set_learning_rate(self.opt_d, (loss_cfg.disc_lr or optim.lr) * lr / optim.lr)
        use_gan = step >= loss_cfg.disc_start and loss_cfg.disc_weight > 0
        logs: dict[str, torch.Tensor] = {}
        pairs = []
        for accumulation in range(optim.grad_accum):
            batch = next(self.loader)
            images = batch["image"].to(self.device, non_blocking=True)
            offset = self.sampler.sample_offset(accumulation)
            generators = [sample_generator(self.run.seed, step, offset + i) for i in range(images.shape[0])]
            sync = accumulation == optim.grad_accum - 1 or not self.context.enabled
            loss, reconstruction = self._generator_loss(images, generators, use_gan, sync, logs)
            (loss / optim.grad_accum).backward()
            pairs.append((images, reconstruction.detach()))
        if optim.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.grad_clip)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if use_gan:
            self._discriminator_step(pairs, logs)
        if self.ema is not None:
            self.ema.update(self.model)
        self._after_step(step + 1, lr, logs, pairs, time.perf_counter() - started)

    def _generator_loss(self, images, generators, use_gan: bool, sync: bool, logs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reconstruction) of one micro-batch: reconstruction + regulariser (+ adaptive GAN term); fills ``logs``."""
        loss_cfg, context, device = self.loss_cfg, self.context, self.device
        generator = self.generator
        with (generator.no_sync() if not sync else contextlib.nullcontext()), autocast_context(self.optim.precision, device):
            module = generator.module if context.enabled else generator
            # DDP syncs gradients in backward; the forward must go through the wrapper.
            reconstruction, regulariser, extra = _encode_decode_ddp(generator, module, images, generators)
            error = images - reconstruction
            l1 = error.abs().mean()
            perceptual_term = (
                self.perceptual(images.float(), reconstruction.float()).mean()
                if loss_cfg.perceptual_weight > 0 else torch.zeros((), device=device)
            )
            reconstruction_loss = loss_cfg.l1_weight * l1 + loss_cfg.perceptual_weight * perceptual_term
            if loss_cfg.l2_weight > 0:
                l2 = error.square().mean()
                reconstruction_loss = reconstruction_loss + loss_cfg.l2_weight * l2
                logs["l2"] = l2.detach()
            weight = loss_cfg.kl_weight if self.config.autoencoder.kind == "kl" else loss_cfg.codebook_weight
            loss = reconstruction_loss + weight * regulariser
            if use_gan:
                self.discriminator.requires_grad_(False)
                generator_loss = -self.discriminator(reconstruction).mean()
                self.discriminator.requires_grad_(True)
                adaptive = adaptive_generator_weight(
                    reconstruction_loss, generator_loss, self.last_layer, loss_cfg.disc_weight,
                    average=(lambda grad: all_reduce_mean(grad, context)) if context.enabled else None,
                )
                loss = loss + adaptive * loss_cfg.disc_factor * generator_loss
                logs["g_loss"] = generator_loss.detach()
                logs["d_weight"] = adaptive
        logs.update({"loss": loss.detach(), "l1": l1.detach(), "perceptual": perceptual_term.detach(), **extra})
        return loss, reconstruction

    def _discriminator_step(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], logs: dict) -> None:
        """Hinge loss on each micro-batch's (real, reconstructed) pair, then one discriminator step."""
        optim = self.optim
        for accumulation, (images, reconstruction) in enumerate(pairs):
            sync = accumulation == optim.grad_accum - 1 or not self.context.enabled
            with (self.disc_ddp.no_sync() if not sync else contextlib.nullcontext()), autocast_context(optim.precision, self.device):
                d_loss = hinge_discriminator_loss(self.disc_ddp(images), self.disc_ddp(reconstruction))
            (d_loss * self.loss_cfg.disc_factor / optim.grad_accum).backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        logs["d_loss"] = d_loss.detach()

    def _after_step(self, done: int, lr: float, logs: dict, pairs: list, elapsed: float) -> None:
        """Progress, metrics, sample grids, validation and checkpoints due after ``done`` steps."""
        run, context, out_dir = self.run, self.context, self.out_dir
        images_per_second = run.batch_size / max(elapsed, 1e-9)
        loss_value = all_reduce_mean(logs["loss"].float(), context).item()
        self.progress.update(loss_value, images_per_second)
        if run.log_every and done % run.log_every == 0:
            values = {f"train/{k}": all_reduce_mean(v.float(), context).item() for k, v in logs.items()}
            self.logger.log(done, {**values, "train/lr": lr, "train/images_per_second": images_per_second})
        if context.is_main and run.sample_every and done % run.sample_every == 0:
            images, reconstruction = pairs[-1]
            count = min(run.num_samples, images.shape[0])
            save_image_grid(torch.cat([images[:count], reconstruction[:count]]), out_dir / "samples" / f"step-{done:08d}.png", columns=count)
        if context.is_main and self.val_records and run.validate_every and done % run.validate_every == 0:
            self.logger.log(done, validate(self.model, self.val_records, self.config, self.device, self.inception))
        if context.is_main and (done % run.checkpoint_every == 0 or done == run.max_steps):
            checkpointing.save_training_state(out_dir, done, {
                "model": self.model.state_dict(), "discriminator": self.discriminator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "config": to_plain(self.config),
            }, run.keep_last)

    def finish(self) -> Path:
        """Close the logs and save the (EMA) autoencoder weights."""
        self.progress.close()
        self.logger.close()
        final = self.out_dir / "autoencoder.safetensors"
        if self.context.is_main:
            if self.ema is not None:
                self.ema.copy_to(self.model)
            save_autoencoder(self.model, final)
        return final


def _encode_decode_ddp(wrapper, module, images, generators):
    """Run the autoencoder through the DDP wrapper's forward when distributed, so gradients get synchronised."""
    if wrapper is module:
        return encode_decode(module, images, generators)
    # DDP only hooks ``forward``; route the training computation through it.
    holder = {}

    def training_forward(x):
        holder["out"] = encode_decode(module, x, generators)
        return holder["out"][0]

    original = module.forward
    module.forward = training_forward
    try:
        wrapper(images)
    finally:
        module.forward = original
    return holder["out"]

