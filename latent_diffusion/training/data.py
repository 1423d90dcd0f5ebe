"""A folder of images (with captions or class sub-folders) as a resumable, sharded stream of batches.

Every random choice (epoch order, crop offset, flip) is a function of the seed, the epoch and the
image index, so a resumed run sees exactly the batches an uninterrupted run would have seen, and
the ranks of a distributed run each read their own disjoint slice of one global batch.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latent_diffusion.config import ConfigError
from latent_diffusion.training.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    label: int


def _read_metadata(root: Path) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line, the HF imagefolder layout)."""
    path = root / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[str(entry["file_name"])] = str(entry.get("text", entry.get("caption", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected a JSON object with 'file_name' and 'text'") from None
    return captions


def scan_image_folder(config: DataConfig) -> tuple[list[ImageRecord], list[str]]:
    """Readable images of ``config.root`` big enough for the crop, and the class names (sub-folders).

    Unreadable files are skipped with a warning; images smaller than the crop are an error (unless
    ``allow_upscale``), reported before training starts.
    """
    root = Path(config.root)
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if config.class_labels and (not classes or any(len(p.relative_to(root).parts) < 2 for p in files)):
        raise ConfigError(f"data.class_labels: every image under {root} must be in a class sub-folder")
    metadata = _read_metadata(root)
    records, too_small, skipped = [], [], []
    for path in files:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError, ValueError):
            skipped.append(path)
            continue
        if min(width, height) < config.size and not config.allow_upscale:
            too_small.append(f"{path.name} ({width}x{height})")
            continue
        relative = path.relative_to(root).as_posix()
        caption_file = path.with_suffix(".txt")
        if relative in metadata:
            caption = metadata[relative]
        elif caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            caption = ""
        label = classes.index(path.relative_to(root).parts[0]) if config.class_labels else 0
        records.append(ImageRecord(path, caption, label))
    if skipped:
        log.warning("skipping %d unreadable image(s): %s", len(skipped), ", ".join(p.name for p in skipped[:5]))
    if too_small:
        raise ConfigError(
            f"data: {len(too_small)} image(s) are smaller than the {config.size}px crop, e.g. "
            f"{', '.join(too_small[:5])}; use larger images, a smaller data.size, or data.allow_upscale=true"
        )
    if not records:
        raise ConfigError(f"data.root: none of the images under {root} could be read")
    return records, (classes if config.class_labels else [])


def split_validation(records: list[ImageRecord], config: DataConfig, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """A fixed, seeded held-out share of the files (none when ``validation_fraction`` is 0)."""
    count = min(int(round(len(records) * config.validation_fraction)), config.max_validation_images)
    if count == 0:
        return records, []
    order = random.Random(seed).sample(range(len(records)), len(records))
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def load_image(path: Path, size: int, crop: str, flip: bool, rng: random.Random) -> torch.Tensor:
    """RGB image -> shorter side resized to ``size`` -> square crop -> optional flip -> [3, size, size] in [-1, 1]."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        if scale != 1.0:
            image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
        width, height = image.size
        if crop == "random":
            left, top = rng.randint(0, width - size), rng.randint(0, height - size)
        else:
            left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        if flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ImageFolderDataset(torch.utils.data.Dataset):
    """Items are addressed by ``(epoch, index)`` so that augmentation is reproducible per epoch."""

    def __init__(self, records: list[ImageRecord], config: DataConfig, seed: int, *, augment: bool = True) -> None:
        self.records = records
        self.config = config
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        # A file that became unreadable after the scan is replaced by the next one, never a crash.
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            rng = random.Random(f"{self.seed}/{epoch}/{index}")
            crop = self.config.crop if self.augment else "center"
            try:
                image = load_image(record.path, self.config.size, crop, self.config.flip and self.augment, rng)
            except (OSError, UnidentifiedImageError, ValueError) as error:
                log.warning("skipping unreadable image %s (%s)", record.path, error)
                continue
            return {"image": image, "caption": record.caption, "label": record.label, "index": index}
        raise RuntimeError("no image of the dataset can be read any more")


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [item["caption"] for item in items],
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class ShardedBatches(torch.utils.data.Sampler):
    """Micro-batches of ``(epoch, index)`` keys for one rank, starting at optimiser step ``start_step``.

    Each epoch is a seeded permutation cut into global batches (the incomplete tail is dropped);
    global batch ``s`` is cut into ``grad_accum * world_size`` equal pieces, and rank ``r`` reads
    piece ``a * world_size + r`` in accumulation round ``a``. The data position is the step itself.
    """

    def __init__(
        self, num_items: int, global_batch: int, *, grad_accum: int, rank: int, world_size: int,
        seed: int, start_step: int = 0,
    ) -> None:
        pieces = grad_accum * world_size
        if global_batch % pieces:
            raise ConfigError(
                f"run.batch_size={global_batch} must be divisible by optim.grad_accum * world size = {pieces}"
            )
        if num_items < global_batch:
            raise ConfigError(f"the dataset has {num_items} images, fewer than one batch ({global_batch})")
        self.num_items, self.global_batch, self.grad_accum = num_items, global_batch, grad_accum
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self.micro_batch = global_batch // pieces
        self.steps_per_epoch = num_items // global_batch

    def global_batch_keys(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        chunk = order[position * self.global_batch : (position + 1) * self.global_batch].tolist()
        return [(epoch, index) for index in chunk]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            keys = self.global_batch_keys(step)
            for accumulation in range(self.grad_accum):
                piece = accumulation * self.world_size + self.rank
                yield keys[piece * self.micro_batch : (piece + 1) * self.micro_batch]
            step += 1

    def sample_offset(self, accumulation: int) -> int:
        """Position within the global batch of this rank's first sample in accumulation round ``accumulation``."""
        return (accumulation * self.world_size + self.rank) * self.micro_batch


def make_loader(dataset: torch.utils.data.Dataset, sampler: ShardedBatches, num_workers: int,
                collate_fn=collate) -> torch.utils.data.DataLoader:
    """A loader over the sharded batch sampler; workers decode images in parallel."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )
