"""Image I/O and conversions between PIL images and model tensors (Pillow only, no torchvision)."""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError


def check_size(width: int, height: int, multiple: int = 8) -> None:
    """Refuse sizes the autoencoder cannot map to a whole latent."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
        if value % multiple:
            raise ValueError(
                f"{name} {value} is not a multiple of {multiple} (the model's downsampling factor); "
                f"try {max(multiple, round(value / multiple) * multiple)}"
            )


def load_image(path: str | os.PathLike, *, what: str = "image") -> Image.Image:
    """Open an image file fully (so later errors cannot happen half-way through a job).

    Pillow refuses images over twice its ``MAX_IMAGE_PIXELS`` (about 179 million pixels, 0.5 GiB as
    RGB) before decoding them; below that, whether a size fits the model is checked when it runs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"{what} file {path} is too large to read: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{what} file {path} is not a readable image ({error})") from None


def to_rgb(image: Image.Image, *, what: str = "image") -> Image.Image:
    """Flatten alpha onto white and convert palette/greyscale images to RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "P", "I", "I;16", "F", "CMYK", "YCbCr", "1"):
        return image.convert("RGB")
    raise ValueError(f"{what} has unsupported mode {image.mode!r}")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor [1, 3, H, W] in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """Float tensor [B, 3, H, W] in [-1, 1] -> list of PIL RGB images (rounded like the reference)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


def mask_to_tensor(mask: Image.Image, size: tuple[int, int], *, blur: float = 0.0) -> torch.Tensor:
    """Mask image (white = repaint) -> float tensor [1, 1, H, W] in [0, 1]."""
    if mask.size != size:
        raise ValueError(f"mask size {mask.size[0]}x{mask.size[1]} does not match image size {size[0]}x{size[1]}")
    grey = mask.convert("L")
    if blur > 0:
        grey = grey.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(grey, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None, None]


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images into a near-square grid."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
