"""Preprocessors without learned weights, the fitting of control maps to the output (A1111's resize
modes, pixel perfect) and the preprocessor list."""
from __future__ import annotations

import numpy as np
import pytest

from latent_diffusion.pipelines.control import RESIZE_MODES
from latent_diffusion.pipelines.control_images import fit_map, pixel_perfect_resolution, resize_map
from latent_diffusion.pipelines.preprocessors import (
    PREPROCESSORS, canny, get_preprocessor, invert, preprocess, scribble_xdog, shuffle, threshold, tile_resample,
)


def _square(size=64, top=16, bottom=48, value=200) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[top:bottom, top:bottom] = value
    return image


def test_canny_outlines_a_square_with_thin_edges():
    edges = canny(_square(), 100, 200)[..., 0] > 0
    assert edges.dtype == bool and set(np.unique(canny(_square(), 100, 200))) == {0, 255}
    # Every edge pixel lies on the square's boundary (one pixel either side), none inside or outside.
    rows, cols = np.nonzero(edges)
    near = lambda v: (abs(v - 16) <= 1) | (abs(v - 47) <= 1)  # noqa: E731
    assert np.all(near(rows) | near(cols))
    assert not edges[24:40, 24:40].any() and not edges[:8].any()
    # Thin: along the left side, each row has at most two edge pixels.
    assert edges[20:44, 10:22].sum(axis=1).max() <= 2
    assert edges[20:44, 10:22].sum(axis=1).min() >= 1


def test_canny_hysteresis_keeps_weak_edges_only_when_joined_to_strong_ones():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, 32:] = 200  # a strong vertical edge (Sobel L1 magnitude 800)
    image[44:, :32] = 30  # a faint step (magnitude 120) running into it
    image[6:14, 6:14] = 30  # a faint square on its own
    edges = canny(image, 60, 400)[..., 0] > 0
    assert edges[:, 30:34].any()
    assert edges[42:46, 2:28].any(axis=0).all()  # the joined faint edge, along its whole length
    assert not edges[:20, :20].any()  # the lone faint square is dropped
    assert edges.sum() < canny(image, 60, 100)[..., 0].astype(bool).sum()  # with a lower high it counts too
    assert not canny(image, 900, 1000).any()  # both thresholds above every gradient


def test_threshold_invert_tile_and_xdog():
    image = _square(value=150)
    assert np.array_equal(threshold(image, 127)[..., 0] > 0, image[..., 0] > 127)
    assert not threshold(image, 160).any()
    assert np.array_equal(invert(image), 255 - image)
    reduced = tile_resample(np.full((64, 48, 3), 90, dtype=np.uint8), 4.0)
    assert reduced.shape == (16, 12, 3) and np.all(reduced == 90)
    assert tile_resample(image, 1.0) is image
    drawing = np.full((64, 64, 3), 255, dtype=np.uint8)
    drawing[30:33, 8:56] = 0  # a black stroke on white
    scribble = scribble_xdog(drawing, 32)[..., 0] > 0
    assert scribble[31, 10:54].all() and not scribble[:20].any()


def test_shuffle_moves_content_smoothly_and_repeats_with_the_seed():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :32] = (255, 0, 0)
    image[:, 32:] = (0, 0, 255)
    a = shuffle(image, np.random.default_rng(1))
    assert np.array_equal(a, shuffle(image, np.random.default_rng(1)))
    assert not np.array_equal(a, shuffle(image, np.random.default_rng(2)))
    assert not np.array_equal(a, image)
    assert set(map(tuple, a.reshape(-1, 3))) <= {(r, 0, 255 - r) for r in range(256)}  # only the image's colours, blended


def test_preprocess_resizes_to_the_resolution_and_learned_ones_pass_the_image_with_a_warning():
    image = _square(size=64)
    canny_ = get_preprocessor("canny")
    edges, warning = preprocess(image, canny_, canny_.settings(128, None, None))
    assert edges.shape == (128, 128, 3) and warning is None
    depth, warning = preprocess(image, get_preprocessor("depth_midas"))
    assert depth is image and "needs a learned detector" in warning and "depth map" in warning
    assert get_preprocessor("invert (from white bg & black line)").name == "invert"
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'hed2'"):
        get_preprocessor("hed2")
    assert {"none", "canny", "threshold", "invert", "tile_resample", "shuffle", "inpaint"} <= set(PREPROCESSORS)
    # Out-of-range sliders take the defaults, as A1111's -1.
    assert get_preprocessor("canny").settings(-1, -1, 300) == (512, 100.0, 200.0)


def test_resize_modes_follow_a1111():
    tall = np.zeros((80, 40, 3), dtype=np.uint8)
    tall[:, :, 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    tall[:4] = 255  # a white top border row band
    stretched = fit_map(tall, 64, 64, RESIZE_MODES[0])
    assert stretched.shape == (64, 64, 3)
    cropped = fit_map(tall, 64, 64, RESIZE_MODES[1])  # scaled to 64 wide (128 high), middle 64 rows kept
    assert cropped.shape == (64, 64, 3) and not (cropped == 255).all(axis=2).any()
    filled = fit_map(tall, 64, 64, RESIZE_MODES[2])  # scaled to 32x64, centred, sides filled
    assert filled.shape == (64, 64, 3)
    border = np.concatenate([tall[0], tall[-1], tall[:, 0], tall[:, -1]])
    assert np.array_equal(filled[10, 0], np.median(border, axis=0).astype(np.uint8))
    assert np.array_equal(filled[:, :16], np.broadcast_to(filled[0, 0], (64, 16, 3)))
    assert pixel_perfect_resolution((40, 80), 64, 64, RESIZE_MODES[1]) == 64  # cover: 40 * 1.6
    assert pixel_perfect_resolution((40, 80), 64, 64, RESIZE_MODES[2]) == 32  # fit: 40 * 0.8


def test_edge_maps_stay_binary_when_resized():
    edges = canny(_square(), 100, 200)
    bigger = resize_map(edges, (100, 100))
    assert set(np.unique(bigger)) <= {0, 255} and bigger.any()
    palette = np.zeros((8, 8, 3), dtype=np.uint8)
    palette[:, :3] = (10, 200, 30)
    palette[:, 3:6] = (200, 10, 30)
    palette[:, 6:] = (30, 30, 200)
    resized = resize_map(palette, (20, 20))
    assert {tuple(c) for c in resized.reshape(-1, 3)} == {(10, 200, 30), (200, 10, 30), (30, 30, 200)}


def test_thin_edges_survive_a_large_reduction():
    edges = canny(_square(size=512, top=128, bottom=384), 100, 200)
    small = resize_map(edges, (32, 32))[..., 0] > 0
    assert small[6:10, 6:26].any() and small[22:26, 6:26].any()  # top and bottom sides are still there
    assert not small[12:20, 12:20].any()  # and the inside is still empty
