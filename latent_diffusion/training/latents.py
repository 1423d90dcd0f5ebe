"""The frozen first stage's latents: encoded per batch while training, or once into a latent cache."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from latent_diffusion.config import ConfigError
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.training.config import ExperimentConfig, validate_experiment
from latent_diffusion.training.data import ImageFolderDataset, scan_image_folder


def encode_latents(first_stage, images: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Unscaled latents: a posterior sample (KL; the mean without generators) or the pre-quantisation latent (VQ)."""
    if isinstance(first_stage, AutoencoderKL):
        posterior = first_stage.encode(images)
        if generators is None:
            return posterior.mean
        noise = torch.cat([torch.randn((1, *posterior.mean.shape[1:]), generator=g) for g in generators])
        return posterior.mean + posterior.std * noise.to(images.device)
    return first_stage.encode(images)


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


def collate_cache(items: list[dict]) -> dict:
    return {"moments": torch.stack([i["moments"] for i in items]), "caption": [i["caption"] for i in items],
            "label": torch.tensor([i["label"] for i in items]), "index": torch.tensor([i["index"] for i in items])}


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
