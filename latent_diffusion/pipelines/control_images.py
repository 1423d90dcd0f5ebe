"""Control images made ready for a ControlNet: preprocessed, then fitted to the output size.

The fitting follows A1111's ControlNet extension: "Just Resize" stretches, "Crop and Resize" scales
to cover and crops the middle, "Resize and Fill" scales to fit and fills the rest with the median
colour of the map's border. Maps of few colours (segmentations, poses, edges) are resized without
blending them: nearest-neighbour for palettes, and two-colour maps re-thresholded afterwards.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from latent_diffusion.pipelines.control import RESIZE_MODES, ControlSet, ControlUnit, PreparedControl, controlnet_runner
from latent_diffusion.pipelines.images import to_rgb
from latent_diffusion.pipelines.preprocessors import INPAINT, get_preprocessor, preprocess

if TYPE_CHECKING:
    from latent_diffusion.pipelines.common import Pipeline

PALETTE_COLOURS = 200  # up to this many colours a map is a palette, resized by nearest neighbour


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution at which the map comes out at the output's scale (A1111's pixel perfect)."""
    raw_width, raw_height = image_size
    k_height, k_width = height / raw_height, width / raw_width
    k = min(k_height, k_width) if resize_mode == RESIZE_MODES[2] else max(k_height, k_width)
    return int(round(k * min(raw_width, raw_height)))


def _colour_count(array: np.ndarray, limit: int) -> int:
    packed = array[..., 0].astype(np.int32) << 16 | array[..., 1].astype(np.int32) << 8 | array[..., 2]
    return min(len(np.unique(packed)), limit + 1)


def resize_map(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 RGB map resized to ``size`` (width, height) without smearing few-colour maps."""
    height, width = array.shape[:2]
    if (width, height) == size:
        return array
    colours = _colour_count(array, PALETTE_COLOURS)
    binary = colours == 2 and array.min() < 16 and array.max() > 240
    if 2 < colours < PALETTE_COLOURS:
        method = Image.Resampling.NEAREST
    elif size[0] * size[1] < width * height:
        method = Image.Resampling.BOX
    else:
        method = Image.Resampling.BICUBIC
    resized = np.asarray(Image.fromarray(array).resize(size, method))
    if binary:
        # Averaging thins one-pixel edges to faint lines; Otsu's level keeps them where 127 would not.
        grey = resized.mean(axis=2)
        resized = np.where(grey > otsu_level(grey), 255, 0).astype(np.uint8)[..., None].repeat(3, axis=2)
    return resized


def otsu_level(grey: np.ndarray) -> float:
    """The level that best splits ``grey``'s values in two classes (Otsu 1979: most variance between them)."""
    counts, edges = np.histogram(grey, bins=256, range=(0, 256))
    weights = counts / max(counts.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(weights)
    mean_below = np.cumsum(weights * centres)
    total = mean_below[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * below - mean_below) ** 2 / (below * (1 - below))
    between = np.nan_to_num(between[:-1], nan=-1.0, posinf=-1.0)
    return float(edges[int(np.argmax(between)) + 1]) if between.max() > 0 else 127.0


def fit_map(array: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """A uint8 map [h, w, C] brought to [height, width, C] by ``resize_mode`` (one of RESIZE_MODES)."""
    if resize_mode == RESIZE_MODES[0]:
        return resize_map(array, (width, height))
    raw_height, raw_width = array.shape[:2]
    k_height, k_width = height / raw_height, width / raw_width
    fill = resize_mode == RESIZE_MODES[2]
    k = min(k_height, k_width) if fill else max(k_height, k_width)
    scaled = resize_map(array, (max(1, round(raw_width * k)), max(1, round(raw_height * k))))
    new_height, new_width = scaled.shape[:2]
    if not fill:
        top, left = max(0, (new_height - height) // 2), max(0, (new_width - width) // 2)
        return scaled[top:top + height, left:left + width]
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    out = np.tile(np.median(border, axis=0).astype(np.uint8), (height, width, 1))
    top, left = max(0, (height - new_height) // 2), max(0, (width - new_width) // 2)
    out[top:top + new_height, left:left + new_width] = scaled
    return out


def _inpaint_hint(image: np.ndarray, mask: Image.Image | None, width: int, height: int,
                  resize_mode: str) -> tuple[torch.Tensor, np.ndarray]:
    """The inpainting ControlNet's input: the image in [0, 1] with masked pixels set to -1 (and a preview)."""
    if mask is None:
        raise ValueError("the inpaint ControlNet preprocessor needs a mask (white = repaint)")
    grey = np.asarray(mask.convert("L").resize((image.shape[1], image.shape[0]), Image.Resampling.NEAREST))
    # Filled borders count as masked, so "Resize and Fill" outpaints them.
    stacked = np.concatenate([image, grey[..., None]], axis=2)
    fitted = fit_map(stacked, width, height, resize_mode)
    if resize_mode == RESIZE_MODES[2]:
        fitted = _mark_fill(fitted, stacked, width, height)
    rgb = torch.from_numpy(fitted[..., :3].copy()).float() / 255
    masked = torch.from_numpy(fitted[..., 3:] > 127)
    hint = torch.where(masked, torch.tensor(-1.0), rgb)
    preview = np.where(masked, 0, fitted[..., :3]).astype(np.uint8)
    return hint.permute(2, 0, 1)[None], preview


def _mark_fill(fitted: np.ndarray, source: np.ndarray, width: int, height: int) -> np.ndarray:
    raw_height, raw_width = source.shape[:2]
    k = min(height / raw_height, width / raw_width)
    new_width, new_height = max(1, round(raw_width * k)), max(1, round(raw_height * k))
    top, left = max(0, (height - new_height) // 2), max(0, (width - new_width) // 2)
    inside = np.zeros((height, width), dtype=bool)
    inside[top:top + new_height, left:left + new_width] = True
    fitted = fitted.copy()
    fitted[..., 3] = np.where(inside, fitted[..., 3], 255)
    return fitted


def prepare_unit(pipe: Pipeline, unit: ControlUnit, width: int, height: int, seed: int) -> tuple[PreparedControl, str | None]:
    """A unit's control map at the output size, ready for sampling (and a warning or None)."""
    image = np.asarray(to_rgb(unit.image, what="ControlNet image"))
    preprocessor = get_preprocessor(unit.module)
    settings = preprocessor.settings(unit.processor_res, unit.threshold_a, unit.threshold_b)
    if unit.pixel_perfect:  # taken as computed, even below the resolution slider's range (as A1111)
        settings = (pixel_perfect_resolution(unit.image.size, width, height, unit.resize_mode), *settings[1:])
    warning = None
    if unit.module in INPAINT:
        hint, preview = _inpaint_hint(image, unit.mask, width, height, unit.resize_mode)
    else:
        detected, warning = preprocess(image, preprocessor, settings, seed=seed)
        preview = fit_map(detected, width, height, unit.resize_mode)
        hint = torch.from_numpy(preview.copy()).permute(2, 0, 1)[None].float() / 255
    channels = unit.controlnet.config.hint_channels
    if channels == 1:
        hint = hint.mean(dim=1, keepdim=True)
    elif channels != hint.shape[1]:
        raise ValueError(f"ControlNet {unit.controlnet.name!r} takes {channels}-channel control images; this package "
                         "makes grey (1) and colour (3) ones")
    prepared = PreparedControl(unit, controlnet_runner(unit.controlnet, pipe), hint.to(pipe.device, pipe.dtype),
                               Image.fromarray(preview), settings)
    return prepared, warning


def prepare_controls(pipe: Pipeline, units, width: int, height: int, seed: int) -> ControlSet | None:
    """Every unit prepared for an output of ``width`` x ``height`` (None without units)."""
    if not units:
        return None
    controls, warnings = [], []
    for unit in units:
        prepared, warning = prepare_unit(pipe, unit, width, height, seed)
        controls.append(prepared)
        if warning is not None and warning not in warnings:
            warnings.append(warning)
    return ControlSet(controls, warnings)


def control_for_batch(pipe: Pipeline, units, width: int, height: int, seed: int, result) -> ControlSet | None:
    """The units prepared for one batch (the shuffle preprocessor draws from ``seed``), their maps and
    warnings recorded in ``result`` (a GenerationResult)."""
    control = prepare_controls(pipe, units, width, height, seed)
    if control is not None:
        result.control_maps = control.detected_maps
        result.warnings += [w for w in control.warnings if w not in result.warnings]
    return control
