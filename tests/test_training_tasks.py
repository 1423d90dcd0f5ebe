"""Each stage-2 task, the latent cache and the VQ + discriminator path run a few steps end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latent_diffusion.training.config import load_experiment
from test_training import TINY, images_and_autoencoder, ldm_overrides

CONCAT_UNET = ["ldm.unet.context_dim=null", "ldm.unet.use_spatial_transformer=false", "ldm.conditioner.kind=none",
               "run.max_steps=2", "run.sample_every=2", "run.num_samples=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return images_and_autoencoder(tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize("task, extra", [
    ("superres", ["ldm.unet.in_channels=7"]),
    ("inpainting", ["ldm.unet.in_channels=9"]),
    ("class", ["ldm.unet.context_dim=32", "ldm.unet.use_spatial_transformer=true", "ldm.conditioner.kind=class",
               "ldm.conditioner.n_classes=2", "data.class_labels=true", "ldm.prediction=v", "ldm.min_snr_gamma=5.0"]),
])
def test_task_trains_and_samples(data, task, extra):
    from latent_diffusion.checkpoints.load import load_checkpoint
    from latent_diffusion.training.ldm import train_ldm

    config = load_experiment(TINY / "ldm-txt2img.yaml", ldm_overrides(data, task, f"ldm.task={task}", *CONCAT_UNET, *extra))
    path = train_ldm(config)
    assert (data / task / "samples" / "step-00000002.png").is_file()
    loaded = load_checkpoint(path, config_yaml=path.with_suffix(".yaml"))
    assert loaded.spec.unet.in_channels == config.ldm.unet.in_channels


def test_latent_cache_trains(data):
    from latent_diffusion.training.latents import cache_latents
    from latent_diffusion.training.ldm import train_ldm

    config = load_experiment(TINY / "ldm-txt2img.yaml", ldm_overrides(data, "cached", "run.max_steps=2"))
    cache = cache_latents(config, str(data / "latents.safetensors"))
    config = load_experiment(TINY / "ldm-txt2img.yaml", ldm_overrides(data, "cached", "run.max_steps=2", f"ldm.latent_cache={cache}"))
    assert train_ldm(config).is_file()


def test_vq_autoencoder_with_discriminator(data, tmp_path):
    from latent_diffusion.training.autoencoder import train_autoencoder

    config = load_experiment(TINY / "autoencoder-kl.yaml", [
        f"data.root={data / 'images'}", f"run.out_dir={tmp_path / 'vq'}", "autoencoder.kind=vq", "autoencoder.double_z=false",
        "autoencoder.n_embed=32", "autoencoder.embed_dim=4", "loss.disc_start=1", "run.max_steps=3", "run.log_every=1",
        "optim.ema_decay=0.9",
    ])
    assert train_autoencoder(config).is_file()
    rows = (tmp_path / "vq" / "metrics.csv").read_text()
    assert "train/perplexity" in rows and "train/d_loss" in rows and "train/d_weight" in rows
