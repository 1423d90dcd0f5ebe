"""Control maps for ControlNet training: each training image's map, made by the package's own preprocessor.

The map is computed from the image exactly as the model sees it (after crop and flip), in the data
loader, so workers make the maps in parallel with the training step; at the shapes world's 64x64 a
canny map takes a few milliseconds. Maps are in [0, 1] like the control images of inference.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from latent_diffusion.config import ConfigError
from latent_diffusion.training.config import ControlNetSettings
from latent_diffusion.training.data import collate

MapMaker = Callable[[np.ndarray], np.ndarray]  # uint8 RGB [H, W, 3] -> uint8 RGB map [H, W, 3]


def map_maker(settings: ControlNetSettings, size: int) -> MapMaker:
    """The configured preprocessor run at the training size with the configured thresholds.

    A threshold outside the preprocessor's slider range is an error here, where inference would
    quietly fall back to the default: a run should train with the value its config names.
    """
    from latent_diffusion.pipelines.preprocessors import get_preprocessor, preprocess

    preprocessor = get_preprocessor(settings.preprocessor)
    for key, slider in (("threshold_a", preprocessor.slider_a), ("threshold_b", preprocessor.slider_b)):
        value = getattr(settings, key)
        if value is None:
            continue
        if slider is None:
            raise ConfigError(f"controlnet.{key}: the {settings.preprocessor} preprocessor has no such setting")
        if not slider.min <= value <= slider.max:
            raise ConfigError(f"controlnet.{key}={value:g} lies outside the {settings.preprocessor} preprocessor's "
                              f"{slider.name!r} range [{slider.min:g}, {slider.max:g}]")
    defaults = preprocessor.settings(size, None, None)
    chosen = (size, *(d if v is None else v for d, v in zip(defaults[1:], (settings.threshold_a, settings.threshold_b))))

    def make(image: np.ndarray) -> np.ndarray:
        return preprocess(image, preprocessor, chosen)[0]

    return make


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """A training image [3, H, W] in [-1, 1] as the uint8 RGB array it was read from."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def map_to_tensor(array: np.ndarray) -> torch.Tensor:
    """A uint8 RGB map [H, W, 3] as the ControlNet's input [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255


class ControlMapDataset(torch.utils.data.Dataset):
    """The items of ``images`` (an ImageFolderDataset) with a ``hint`` key: the control map of the image."""

    def __init__(self, images: torch.utils.data.Dataset, make_map: MapMaker) -> None:
        self.images = images
        self.make_map = make_map

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        item = self.images[key]
        return {**item, "hint": map_to_tensor(self.make_map(image_to_uint8(item["image"])))}


def collate_with_hints(items: list[dict]) -> dict:
    return {**collate(items), "hint": torch.stack([item["hint"] for item in items])}
