"""Stage 2: train the diffusion model in the latent space of a frozen autoencoder (Rombach et al. 2022, eq. 2).

Read top to bottom: build the model, resume, then per step draw (t, noise, condition dropout)
from per-sample generators, noise the latents, predict eps / v / x0, weight by min-SNR if asked,
step AdamW, update the EMA, log, sample, checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel

from latent_diffusion.config import ConfigError
from latent_diffusion.diffusion.schedules import alphas_cumprod_for
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.training import checkpointing
from latent_diffusion.training.config import ExperimentConfig, to_plain, validate_experiment
from latent_diffusion.training.data import ImageFolderDataset, ShardedBatches, make_loader, scan_image_folder
from latent_diffusion.training.distributed import DistributedContext, setup_distributed, teardown_distributed
from latent_diffusion.training.distributed import all_reduce_mean
from latent_diffusion.training.ema import EMA
from latent_diffusion.training.ldm_model import (
    ConditionedUNet, build_training_model, concat_condition, export_single_file, make_tokenizer, random_masks,
)
from latent_diffusion.training.loop import (
    Progress, adamw, autocast_context, enable_gradient_checkpointing, learning_rate, sample_generator, save_image_grid,
    set_learning_rate,
)
from latent_diffusion.training.metrics import MetricsLogger

log = logging.getLogger(__name__)


class LatentCacheDataset(torch.utils.data.Dataset):
    """Rows of a latent cache (posterior mean and std per image), addressed like ImageFolderDataset."""

    def __init__(self, path: str) -> None:
        from latent_diffusion.checkpoints.io import read_state_dict

        if not Path(path).is_file():
            raise ConfigError(f"ldm.latent_cache: {path} is not a file (build it with `ldm cache-latents`)")
        tensors = read_state_dict(path)
        self.mean, self.std, self.labels = tensors["mean"], tensors.get("std"), tensors["label"]
        self.captions = json.loads(Path(path).with_suffix(".json").read_text())["captions"]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        _epoch, index = key
        std = self.std[index] if self.std is not None else torch.zeros_like(self.mean[index])
        return {"moments": torch.cat([self.mean[index], std]), "caption": self.captions[index],
                "label": int(self.labels[index]), "index": index}


def _collate_cache(items: list[dict]) -> dict:
    return {"moments": torch.stack([i["moments"] for i in items]), "caption": [i["caption"] for i in items],
            "label": torch.tensor([i["label"] for i in items]), "index": torch.tensor([i["index"] for i in items])}


def encode_latents(first_stage, images: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Unscaled latents: a posterior sample (KL; the mean without generators) or the pre-quantisation latent (VQ)."""
    if isinstance(first_stage, AutoencoderKL):
        posterior = first_stage.encode(images)
        if generators is None:
            return posterior.mean
        noise = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=g) for g in generators])
        return posterior.mean + posterior.std * noise.to(images.device)
    return first_stage.encode(images)


@torch.no_grad()
def cache_latents(config: ExperimentConfig, output: str) -> Path:
    """Encode every training image once (center crop, no flip) into ``output`` (+ captions in a .json)."""
    from latent_diffusion.checkpoints.io import save_safetensors
    from latent_diffusion.training.ldm_model import load_first_stage

    validate_experiment(config)
    records, _ = scan_image_folder(config.data)
    dataset = ImageFolderDataset(records, config.data, config.run.seed, augment=False)
    first_stage = load_first_stage(config.ldm.first_stage or config.ldm.init_checkpoint).eval()
    means, stds = [], []
    with tqdm(total=len(dataset), desc="encoding", unit="image", disable=not config.run.progress) as bar:
        for start in range(0, len(dataset), 16):
            images = torch.stack([dataset[(0, i)]["image"] for i in range(start, min(start + 16, len(dataset)))])
            if isinstance(first_stage, AutoencoderKL):
                posterior = first_stage.encode(images)
                means.append(posterior.mean)
                stds.append(posterior.std)
            else:
                means.append(first_stage.encode(images))
            bar.update(images.shape[0])
    tensors = {"mean": torch.cat(means), "label": torch.tensor([r.label for r in records])}
    if stds:
        tensors["std"] = torch.cat(stds)
    path = Path(output)
    save_safetensors(tensors, path, {"data.root": config.data.root, "data.size": str(config.data.size)})
    path.with_suffix(".json").write_text(json.dumps({"captions": [r.caption for r in records]}))
    return path


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) expressed for each prediction target."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def train_ldm(config: ExperimentConfig) -> Path:
    """Run stage 2 to ``run.max_steps`` (resuming when a checkpoint exists); returns the single-file checkpoint."""
    validate_experiment(config)
    context = setup_distributed(config.run.device)
    try:
        return _train(config, context)
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


def _train(config: ExperimentConfig, context: DistributedContext) -> Path:
    run, optim, settings = config.run, config.optim, config.ldm
    device = context.device
    out_dir = Path(run.out_dir)
    if settings.latent_cache and settings.task in ("superres", "inpainting"):
        raise ConfigError(f"ldm.latent_cache: task {settings.task!r} needs the images; train without a cache")
    if settings.latent_cache:
        dataset = LatentCacheDataset(settings.latent_cache)
        collate = _collate_cache
    else:
        records, _ = scan_image_folder(config.data)
        dataset = ImageFolderDataset(records, config.data, run.seed)
        collate = None

    torch.manual_seed(run.seed)
    model, encoder_trains = build_training_model(config)
    model.to(device)
    spec = model.spec
    first_stage = model.first_stage_model.eval().requires_grad_(False)
    if model.cond_stage_model is not None and not encoder_trains:
        model.cond_stage_model.eval().requires_grad_(False)
    if encoder_trains and hasattr(model.cond_stage_model, "transformer"):
        # The BERTEmbedder's language-model head is never used for conditioning; DDP wants every trained weight used.
        model.cond_stage_model.transformer.to_logits.requires_grad_(False)
    network = ConditionedUNet(model.unet, model.cond_stage_model if encoder_trains else None)
    if optim.gradient_checkpointing:
        enable_gradient_checkpointing([*model.unet.input_blocks, model.unet.middle_block, *model.unet.output_blocks])
    tokenizer = make_tokenizer(spec)
    trainable = [p for p in network.parameters() if p.requires_grad]
    groups: list = trainable
    if encoder_trains and settings.conditioner.lr_scale != 1.0:
        in_encoder = {id(p) for p in network.encoder.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in in_encoder], "lr_scale": 1.0},
                  {"params": [p for p in trainable if id(p) in in_encoder], "lr_scale": settings.conditioner.lr_scale}]
    optimizer = adamw(groups, optim)
    ema = EMA(network, optim.ema_decay) if optim.ema_decay > 0 else None
    alphas_cumprod = alphas_cumprod_for(spec.schedule).to(device=device, dtype=torch.float32)
    scale_factor = settings.scale_factor if settings.scale_factor is not None else (spec.scale_factor if settings.init_checkpoint else None)

    start_step = 0
    state = checkpointing.load_latest_training_state(out_dir) if run.resume else None
    if state is not None:
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        scale_factor = float(state["scale_factor"])
        checkpointing.restore_rng_states(state["rng"])
        start_step = int(state["step"])

    wrapped = DistributedDataParallel(network) if context.enabled else network
    sampler = ShardedBatches(len(dataset), run.batch_size, grad_accum=optim.grad_accum, rank=context.rank,
                             world_size=context.world_size, seed=run.seed, start_step=start_step)
    if collate is None:
        loader = iter(make_loader(dataset, sampler, config.data.num_workers))
    else:
        loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    logger = MetricsLogger(out_dir, context.is_main)
    progress = Progress(run.progress and context.is_main, start_step, run.max_steps)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_plain(config), indent=2))

    for step in range(start_step, run.max_steps):
        started = time.perf_counter()
        lr = learning_rate(step, optim, run.max_steps)
        set_learning_rate(optimizer, lr)
        total = torch.zeros((), device=device)
        for accumulation in range(optim.grad_accum):
            batch = next(loader)
            offset = sampler.sample_offset(accumulation)
            generators = [sample_generator(run.seed, step, offset + i) for i in range(len(batch["caption"]))]
            images = batch["image"].to(device) if "image" in batch else None
            with torch.no_grad():
                if images is None:
                    mean, std = batch["moments"].to(device).chunk(2, dim=1)
                    noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g) for g in generators])
                    z = mean + std * noise.to(device)
                else:
                    z = encode_latents(first_stage, images, generators)
                if scale_factor is None:
                    # Rescale latents to unit variance, estimated from the first global batch (Rombach et al. 4.3.2).
                    moments = torch.stack([z.mean(), z.square().mean()])
                    moments = all_reduce_mean(moments, context)
                    scale_factor = float(1.0 / (moments[1] - moments[0] ** 2).clamp(min=1e-12).sqrt())
                    if context.is_main:
                        log.info("latent scale factor estimated from the first batch: %.5f", scale_factor)
                z = z * scale_factor
                masks = random_masks(generators, images.shape[-1]).to(device) if settings.task == "inpainting" else None
                concat = concat_condition(settings.task, images, masks, tuple(z.shape[-2:]),
                                          lambda x: encode_latents(first_stage, x, None) * scale_factor) if images is not None else None
                condition, _dropped = _condition_inputs(settings, tokenizer, batch, generators, device)
                frozen_context = None
                if condition is not None and not encoder_trains:
                    frozen_context = model.cond_stage_model(condition)
                    condition = None
                t = torch.cat([torch.randint(0, spec.schedule.timesteps, (1,), generator=g) for g in generators]).to(device)
                eps = torch.cat([torch.randn((1, *z.shape[1:]), generator=g) for g in generators]).to(device)
                alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
                x_t = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps
                target = {"eps": eps, "x0": z, "v": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z}[spec.prediction]
                model_input = torch.cat([x_t, concat], dim=1) if concat is not None else x_t
            sync = accumulation == optim.grad_accum - 1 or not context.enabled
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast_context(optim.precision, device):
                prediction = wrapped(model_input, t.float(), condition, frozen_context)
                per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
                if settings.min_snr_gamma is not None:
                    snr = alpha_bar.view(-1) / (1 - alpha_bar.view(-1))
                    per_sample = per_sample * min_snr_weight(snr, settings.min_snr_gamma, spec.prediction)
                loss = per_sample.mean()
            (loss / optim.grad_accum).backward()
            total += loss.detach() / optim.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip) if optim.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(network)

        done = step + 1
        elapsed = max(time.perf_counter() - started, 1e-9)
        loss_value = all_reduce_mean(total, context).item()
        progress.update(loss_value, run.batch_size / elapsed)
        if run.log_every and done % run.log_every == 0:
            values = {"train/loss": loss_value, "train/lr": lr, "train/images_per_second": run.batch_size / elapsed}
            if grad_norm is not None:
                values["train/grad_norm"] = float(grad_norm)
            logger.log(done, values)
        if context.is_main and run.sample_every and done % run.sample_every == 0:
            _save_samples(model, network, ema, spec, scale_factor, batch, settings, out_dir / "samples" / f"step-{done:08d}.png", run)
        if context.is_main and (done % run.checkpoint_every == 0 or done == run.max_steps):
            checkpointing.save_training_state(out_dir, done, {
                "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "scale_factor": scale_factor,
                "config": to_plain(config),
            }, run.keep_last)
    progress.close()
    logger.close()

    final = out_dir / "model.safetensors"
    if context.is_main:
        import dataclasses

        model.spec = dataclasses.replace(spec, scale_factor=scale_factor)
        export_single_file(model, ema.shadow if ema is not None else None,
                           (ema.decay, ema.num_updates) if ema is not None else (0.0, 0), final,
                           carry_from=settings.init_checkpoint)
    return final


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
