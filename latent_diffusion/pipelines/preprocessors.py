"""Control maps from ordinary images, for ControlNets: the preprocessors that need no learned weights.

Names, labels, sliders and defaults are those of A1111's ControlNet extension, so its clients can
pick them. Each runs on an RGB array at the "processor resolution" (the image's short side brought
to it) and returns the control map as uint8 RGB. Preprocessors whose maps come from a learned
detector (depth, pose, line art...) are listed too: this package has no detector, so they take the
image as the ready map (made elsewhere) and say so in the run's warnings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's settings, in the shape A1111's ``module_detail`` lists it."""

    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def api_json(self) -> dict[str, float | str]:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    run: Callable[..., np.ndarray] | None  # None: the image is the map (none; learned detectors)
    resolution: Slider | None = None
    slider_a: Slider | None = None
    slider_b: Slider | None = None
    detector: str | None = None  # what a learned detector would compute from the image

    @property
    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.slider_a, self.slider_b) if s is not None]

    def settings(self, resolution: float | None, a: float | None, b: float | None) -> tuple[int, float, float]:
        """The resolution and thresholds to run with: out-of-range or missing values take the
        defaults, as A1111 does for its ``-1`` "unset"."""
        def pick(value, slider: Slider | None) -> float:
            if slider is None:
                return 0.0
            return float(value) if value is not None and slider.min <= value <= slider.max else slider.value

        return int(pick(resolution, self.resolution or RESOLUTION)), pick(a, self.slider_a), pick(b, self.slider_b)


# ---------------------------------------------------------------------------------------------- helpers
def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, C] uint8 -> [1, C, H, W] float in [0, 255]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [1, C, H, W], edges replicated."""
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(x.shape[1], 1, 1, -1), groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(x.shape[1], 1, -1, 1), groups=x.shape[1])


def resize_short_side(image: np.ndarray, resolution: int) -> np.ndarray:
    """The image with its short side brought to ``resolution`` (bicubic up, area-averaged down)."""
    height, width = image.shape[:2]
    k = resolution / min(height, width)
    size = (max(1, round(width * k)), max(1, round(height * k)))
    if size == (width, height):
        return image
    method = Image.Resampling.BICUBIC if k > 1 else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize(size, method))


# ---------------------------------------------------------------------------------------------- canny
def _sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical 3x3 Sobel derivatives of [1, C, H, W] (borders reflected)."""
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([gx, gx.t()])[:, None].repeat(image.shape[1], 1, 1, 1)
    padded = F.pad(image, (1, 1, 1, 1), mode="reflect")
    out = F.conv2d(padded, kernels, groups=image.shape[1])
    return out[:, 0::2], out[:, 1::2]


def _non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """The magnitude where it is a maximum across the edge (gradient direction in four bins), else 0."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

    bins = [((angle < 22.5) | (angle >= 157.5), (0, 1)), ((angle >= 22.5) & (angle < 67.5), (1, 1)),
            ((angle >= 67.5) & (angle < 112.5), (1, 0)), ((angle >= 112.5) & (angle < 157.5), (1, -1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for in_bin, (dy, dx) in bins:
        keep |= in_bin & (magnitude >= shifted(dy, dx)) & (magnitude > shifted(-dy, -dx))
    return magnitude * keep


def _components(mask: torch.Tensor) -> torch.Tensor:
    """A label per pixel of ``mask`` (8-connected components; the smallest flat index in each), -1 elsewhere."""
    height, width = mask.shape
    big = height * width
    labels = torch.where(mask, torch.arange(big).view(height, width), torch.full_like(mask, big, dtype=torch.long))
    while True:
        smallest = -F.max_pool2d(-labels[None, None].float(), 3, stride=1, padding=1)[0, 0].long()
        updated = torch.where(mask, torch.minimum(labels, smallest), labels)
        # Pointer jumping: each pixel takes its label's label, so labels travel far in few rounds.
        flat = updated.flatten()
        for _ in range(4):
            flat = torch.where(flat < big, flat[flat.clamp(max=big - 1)], flat)
        updated = flat.view(height, width)
        if torch.equal(updated, labels):
            return torch.where(mask, labels, torch.full_like(labels, -1))
        labels = updated


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges (white on black): Sobel gradients of the strongest channel (L1 magnitude), thinned
    to their ridges, kept where above ``high`` or connected to such through pixels above ``low``."""
    x = _to_tensor(image)
    gx, gy = _sobel(x)
    magnitudes = gx.abs() + gy.abs()
    strongest = magnitudes.argmax(dim=1, keepdim=True)
    pick = lambda t: t.gather(1, strongest)[0, 0]  # noqa: E731
    thin = _non_maximum_suppression(pick(magnitudes), pick(gx), pick(gy))
    low, high = min(low, high), max(low, high)
    weak, strong = thin > low, thin > high
    labels = _components(weak)
    kept = torch.isin(labels, labels[strong].unique()) & weak
    return (kept.numpy().astype(np.uint8) * 255)[..., None].repeat(3, axis=2)


# ---------------------------------------------------------------------------------------------- the others
def threshold(image: np.ndarray, level: float) -> np.ndarray:
    """White where every channel is above ``level`` (a scribble from a drawing or a photo)."""
    white = image.min(axis=2) > level
    return (white.astype(np.uint8) * 255)[..., None].repeat(3, axis=2)


def scribble_xdog(image: np.ndarray, level: float) -> np.ndarray:
    """A scribble from a difference of Gaussians (sigma 0.5 and 5): white where the fine detail is dark."""
    x = _to_tensor(image)
    difference = (_gaussian_blur(x, 5.0) - _gaussian_blur(x, 0.5)).min(dim=1).values[0]
    dog = (255 - difference).clamp(0, 255).floor()
    white = 2 * (255 - dog) > level
    return (white.numpy().astype(np.uint8) * 255)[..., None].repeat(3, axis=2)


def invert(image: np.ndarray) -> np.ndarray:
    """255 - image: a black drawing on white becomes the white-on-black map line ControlNets take."""
    return 255 - image


def tile_resample(image: np.ndarray, rate: float) -> np.ndarray:
    """The image reduced by ``rate`` (the tile ControlNet then adds the detail back)."""
    if rate < 1.1:
        return image
    height, width = image.shape[:2]
    size = (max(1, int(width / rate)), max(1, int(height / rate)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _smooth_noise(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Noise in [0, 1] that varies smoothly over about ``cell`` pixels."""
    coarse = rng.random((1, 1, height // cell + 2, width // cell + 2), dtype=np.float32)
    fine = F.interpolate(torch.from_numpy(coarse), size=(height + 2 * cell, width + 2 * cell), mode="bicubic",
                         align_corners=False)[0, 0, cell:cell + height, cell:cell + width]
    fine = fine - fine.min()
    return (fine / fine.max().clamp(min=1e-6)).numpy()


def shuffle(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image's content moved along a smooth random flow (the shuffle ControlNet's input)."""
    height, width = image.shape[:2]
    cell = 256
    flow_x = _smooth_noise(height, width, cell, rng) * 2 - 1
    flow_y = _smooth_noise(height, width, cell, rng) * 2 - 1
    grid = torch.from_numpy(np.stack([flow_x, flow_y], axis=-1))[None]
    warped = F.grid_sample(_to_tensor(image), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- registry
def _learned(name: str, label: str, detector: str) -> Preprocessor:
    return Preprocessor(name, label, None, RESOLUTION, detector=detector)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "none", None),
    Preprocessor("canny", "canny", lambda image, a, b, rng: canny(image, a, b), RESOLUTION,
                 Slider("Canny Low Threshold", 100, 1, 255), Slider("Canny High Threshold", 200, 1, 255)),
    Preprocessor("threshold", "threshold", lambda image, a, b, rng: threshold(image, a), RESOLUTION,
                 Slider("Binarization Threshold", 127, 0, 255)),
    Preprocessor("scribble_xdog", "scribble_xdog", lambda image, a, b, rng: scribble_xdog(image, a), RESOLUTION,
                 Slider("XDoG Threshold", 32, 1, 64)),
    Preprocessor("invert", "invert (from white bg & black line)", lambda image, a, b, rng: invert(image)),
    Preprocessor("tile_resample", "tile_resample", lambda image, a, b, rng: tile_resample(image, a), None,
                 Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)),
    Preprocessor("shuffle", "shuffle", lambda image, a, b, rng: shuffle(image, rng)),
    # The inpainting ControlNet's map is the image with the masked pixels marked (see control.py).
    Preprocessor("inpaint", "inpaint_global_harmonious", None),
    Preprocessor("inpaint_only", "inpaint_only", None),
    _learned("depth_midas", "depth_midas", "a depth map (near is bright)"),
    _learned("depth_zoe", "depth_zoe", "a depth map (near is bright)"),
    _learned("normal_bae", "normal_bae", "a normal map"),
    _learned("openpose", "openpose", "an OpenPose skeleton drawing"),
    _learned("openpose_full", "openpose_full", "an OpenPose skeleton drawing with hands and face"),
    _learned("lineart_realistic", "lineart_realistic", "a line drawing (white lines on black)"),
    _learned("lineart_anime", "lineart_anime", "a line drawing (white lines on black)"),
    _learned("softedge_hed", "softedge_hed", "a soft edge map (white on black)"),
    _learned("mlsd", "mlsd", "straight line segments (white on black)"),
    _learned("seg_ofade20k", "seg_ofade20k", "an ADE20K segmentation colour map"),
)}
_BY_LABEL = {p.label: p for p in PREPROCESSORS.values()}
# The inpainting preprocessors, which read a mask beside the image.
INPAINT = ("inpaint", "inpaint_only")


def get_preprocessor(name: str) -> Preprocessor:
    """A preprocessor by A1111 name or label (ValueError naming the choices otherwise)."""
    found = PREPROCESSORS.get(name) or _BY_LABEL.get(name)
    if found is None:
        raise ValueError(f"unknown ControlNet preprocessor {name!r}; choose one of {sorted(PREPROCESSORS)}")
    return found


def preprocess(image: np.ndarray, preprocessor: Preprocessor, settings: tuple[int, float, float] | None = None,
               seed: int = 0) -> tuple[np.ndarray, str | None]:
    """(control map as uint8 RGB, a warning or None) of an RGB uint8 image; ``settings``: resolution
    and thresholds (default: the preprocessor's, see :meth:`Preprocessor.settings`)."""
    if preprocessor.run is None:
        warning = None
        if preprocessor.detector is not None:
            warning = (f"ControlNet preprocessor {preprocessor.name!r} needs a learned detector, which this package "
                       f"does not have: the image was used as the ready map ({preprocessor.detector})")
        return image, warning
    size, a, b = settings or preprocessor.settings(None, None, None)
    if preprocessor.resolution is not None:
        image = resize_short_side(image, size)
    return preprocessor.run(image, a, b, np.random.default_rng(seed)), None
