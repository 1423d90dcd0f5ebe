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
from latent_diffusion.training import checkpointing
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


def _encode_decode(model, images: torch.Tensor, generators: list[torch.Generator]):
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
def _init_logvar(model: AutoencoderKL, value: float) -> None:
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
        return _train(config, context)
    finally:
        teardown_distributed()


def _train(config: ExperimentConfig, context: DistributedContext) -> Path:
    run, optim, loss_cfg = config.run, config.optim, config.loss
    device = context.device
    out_dir = Path(run.out_dir)
    records, _classes = scan_image_folder(config.data)
    train_records, val_records = split_validation(records, config.data, run.seed)

    torch.manual_seed(run.seed)  # identical initial weights on every rank
    model = build_autoencoder(config).to(device)
    if loss_cfg.logvar_init is not None and isinstance(model, AutoencoderKL):
        _init_logvar(model, loss_cfg.logvar_init)
    discriminator = PatchDiscriminator(config.autoencoder.out_ch, loss_cfg.disc_channels, loss_cfg.disc_layers).to(device)
    if context.enabled and device.type == "cuda":
        # Batch statistics over the global batch, as one process would see them. SyncBatchNorm has no
        # CPU kernel, so under gloo each rank normalises its own share (as CompVis' multi-GPU runs did).
        # Converted before the optimiser and any resumed state see the parameters; the keys stay the same.
        discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
    perceptual = build_perceptual_loss(loss_cfg.lpips_weights, loss_cfg.vgg_weights).to(device)
    if optim.gradient_checkpointing:
        enable_gradient_checkpointing([*model.encoder.down, model.encoder.mid, model.decoder.mid, *model.decoder.up])
    opt_g = adamw(model.parameters(), optim)
    opt_d = adamw(discriminator.parameters(), optim, lr=loss_cfg.disc_lr or optim.lr)
    ema = EMA(model, optim.ema_decay) if optim.ema_decay > 0 else None
    inception = InceptionFeatures(run.inception_weights, device) if run.inception_weights else None

    start_step = 0
    state = checkpointing.load_latest_training_state(out_dir) if run.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        checkpointing.restore_rng_states(state["rng"])
        start_step = int(state["step"])
        if context.is_main:
            log.info("resumed from step %d", start_step)

    generator = DistributedDataParallel(model) if context.enabled else model
    disc_ddp = DistributedDataParallel(discriminator) if context.enabled else discriminator
    sampler = ShardedBatches(len(train_records), run.batch_size, grad_accum=optim.grad_accum, rank=context.rank,
                             world_size=context.world_size, seed=run.seed, start_step=start_step)
    loader = iter(make_loader(ImageFolderDataset(train_records, config.data, run.seed), sampler, config.data.num_workers))
    logger = MetricsLogger(out_dir, context.is_main)
    progress = Progress(run.progress and context.is_main, start_step, run.max_steps)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_plain(config), indent=2))

    last_layer = model.get_last_layer()
    for step in range(start_step, run.max_steps):
        started = time.perf_counter()
        lr = learning_rate(step, optim, run.max_steps)
        set_learning_rate(opt_g, lr)
        set_learning_rate(opt_d, (loss_cfg.disc_lr or optim.lr) * lr / optim.lr)
        use_gan = step >= loss_cfg.disc_start and loss_cfg.disc_weight > 0
        logs: dict[str, torch.Tensor] = {}
        pairs = []
        for accumulation in range(optim.grad_accum):
            batch = next(loader)
            images = batch["image"].to(device, non_blocking=True)
            offset = sampler.sample_offset(accumulation)
            generators = [sample_generator(run.seed, step, offset + i) for i in range(images.shape[0])]
            sync = accumulation == optim.grad_accum - 1 or not context.enabled
            with (generator.no_sync() if not sync else contextlib.nullcontext()), autocast_context(optim.precision, device):
                module = generator.module if context.enabled else generator
                # DDP syncs gradients in backward; the forward must go through the wrapper.
                reconstruction, regulariser, extra = _encode_decode_ddp(generator, module, images, generators)
                error = images - reconstruction
                l1 = error.abs().mean()
                perceptual_term = (
                    perceptual(images.float(), reconstruction.float()).mean()
                    if loss_cfg.perceptual_weight > 0 else torch.zeros((), device=device)
                )
                reconstruction_loss = loss_cfg.l1_weight * l1 + loss_cfg.perceptual_weight * perceptual_term
                if loss_cfg.l2_weight > 0:
                    l2 = error.square().mean()
                    reconstruction_loss = reconstruction_loss + loss_cfg.l2_weight * l2
                    logs["l2"] = l2.detach()
                weight = loss_cfg.kl_weight if config.autoencoder.kind == "kl" else loss_cfg.codebook_weight
                loss = reconstruction_loss + weight * regulariser
                if use_gan:
                    discriminator.requires_grad_(False)
                    generator_loss = -discriminator(reconstruction).mean()
                    discriminator.requires_grad_(True)
                    adaptive = adaptive_generator_weight(
                        reconstruction_loss, generator_loss, last_layer, loss_cfg.disc_weight,
                        average=(lambda grad: all_reduce_mean(grad, context)) if context.enabled else None,
                    )
                    loss = loss + adaptive * loss_cfg.disc_factor * generator_loss
                    logs["g_loss"] = generator_loss.detach()
                    logs["d_weight"] = adaptive
            (loss / optim.grad_accum).backward()
            pairs.append((images, reconstruction.detach()))
            logs.update({"loss": loss.detach(), "l1": l1.detach(), "perceptual": perceptual_term.detach(), **extra})
        if optim.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        if use_gan:
            for accumulation, (images, reconstruction) in enumerate(pairs):
                sync = accumulation == optim.grad_accum - 1 or not context.enabled
                with (disc_ddp.no_sync() if not sync else contextlib.nullcontext()), autocast_context(optim.precision, device):
                    d_loss = hinge_discriminator_loss(disc_ddp(images), disc_ddp(reconstruction))
                (d_loss * loss_cfg.disc_factor / optim.grad_accum).backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs["d_loss"] = d_loss.detach()
        if ema is not None:
            ema.update(model)

        done = step + 1
        elapsed = time.perf_counter() - started
        loss_value = all_reduce_mean(logs["loss"].float(), context).item()
        progress.update(loss_value, run.batch_size / max(elapsed, 1e-9))
        if run.log_every and done % run.log_every == 0:
            values = {f"train/{k}": all_reduce_mean(v.float(), context).item() for k, v in logs.items()}
            logger.log(done, {**values, "train/lr": lr, "train/images_per_second": run.batch_size / max(elapsed, 1e-9)})
        if context.is_main and run.sample_every and done % run.sample_every == 0:
            images, reconstruction = pairs[-1]
            count = min(run.num_samples, images.shape[0])
            save_image_grid(torch.cat([images[:count], reconstruction[:count]]), out_dir / "samples" / f"step-{done:08d}.png", columns=count)
        if context.is_main and val_records and run.validate_every and done % run.validate_every == 0:
            logger.log(done, validate(model, val_records, config, device, inception))
        if context.is_main and (done % run.checkpoint_every == 0 or done == run.max_steps):
            checkpointing.save_training_state(out_dir, done, {
                "model": model.state_dict(), "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "config": to_plain(config),
            }, run.keep_last)
    progress.close()
    logger.close()

    final = out_dir / "autoencoder.safetensors"
    if context.is_main:
        if ema is not None:
            ema.copy_to(model)
        save_autoencoder(model, final)
    return final


def _encode_decode_ddp(wrapper, module, images, generators):
    """Run the autoencoder through the DDP wrapper's forward when distributed, so gradients get synchronised."""
    if wrapper is module:
        return _encode_decode(module, images, generators)
    # DDP only hooks ``forward``; route the training computation through it.
    holder = {}

    def training_forward(x):
        holder["out"] = _encode_decode(module, x, generators)
        return holder["out"][0]

    original = module.forward
    module.forward = training_forward
    try:
        wrapper(images)
    finally:
        module.forward = original
    return holder["out"]

