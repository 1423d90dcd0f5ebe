"""Image conversions and the clear errors users get for bad image input."""
import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.pipelines.images import (
    check_size, image_to_tensor, load_image, make_grid, mask_to_tensor, tensor_to_images, to_rgb,
)


def test_tensor_round_trip_is_exact_for_8_bit_images():
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    tensor = image_to_tensor(Image.fromarray(pixels))
    assert tensor.shape == (1, 3, 16, 24) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_images(tensor)[0]), pixels)


def test_alpha_is_flattened_on_white_and_grey_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)


@pytest.mark.parametrize("width, height", [(60, 64), (64, 0), (64, 65)])
def test_size_not_multiple_of_8_is_refused(width, height):
    with pytest.raises(ValueError, match="multiple of 8|positive"):
        check_size(width, height)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="init image file not found"):
        load_image(tmp_path / "nope.png", what="init image")
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "x.png")


def test_mask_size_mismatch_and_values():
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    tensor = mask_to_tensor(mask, (8, 8))
    assert tensor.shape == (1, 1, 8, 8) and tensor[0, 0, 0, 0] == 1 and tensor[0, 0, 0, 7] == 0
    with pytest.raises(ValueError, match="does not match image size"):
        mask_to_tensor(mask, (16, 8))
    blurred = mask_to_tensor(mask, (8, 8), blur=1.0)
    assert 0 < blurred[0, 0, 0, 4] < 1


def test_grid_layout():
    images = [Image.new("RGB", (4, 4), (i * 50, 0, 0)) for i in range(5)]
    grid = make_grid(images)
    assert grid.size == (12, 8)
    assert grid.getpixel((4, 0)) == (50, 0, 0) and grid.getpixel((4, 4)) == (200, 0, 0)
    with pytest.raises(ValueError):
        tensor_to_images(torch.zeros(1, 4, 8, 8))
