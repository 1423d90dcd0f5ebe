"""A judge of shapes-world images that learns nothing: it measures.

Pixels far from the background colour are objects; each connected region is one object. Its hue
names the colour; its bounding-box fill (measured on partial pixels, see ``_coverage``), solidity
(area over convex-hull area) and the corners of its convex hull name the shape; its area (over the
area that shape has at each size) names the size, and its centre the position. The expected
measurements follow from the outlines the renderer draws (data/shapes.py), not from examples, so
this judge is a second opinion beside the learned classifier: where the two disagree, one of them
misreads the image.
"""
from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass

import numpy as np

from latent_diffusion.data import shapes
from latent_diffusion.data.shapes import (
    BACKGROUND_RGB, COLOUR_RGB, POSITION_CENTERS, SHAPES, SIZE_RADII, ShapeObject,
)
from latent_diffusion.evaluation.shapes_classifier import SceneReading

# A pixel belongs to an object when its colour is this far (RGB, 0-255) from the background: half
# the smallest distance between a background and an object colour (gray to purple, about 90).
FOREGROUND_DISTANCE = 45.0
# Regions smaller than this share of the smallest object the renderer draws are specks, not objects.
MIN_OBJECT_SHARE = 0.3
# Hull simplification stops before the polygon loses this share of its area: a circle keeps many
# corners (an inscribed octagon already loses 10%), a square 4, a star's hull 5; a triangle's
# acute corners, cut by pixels, leave it 4 to 6 (its fill and solidity tell it anyway).
HULL_AREA_TOLERANCE = 0.05
MANY_CORNERS = 8  # what a circle's hull counts as


@dataclass(frozen=True)
class ShapeGeometry:
    """What a shape measures when drawn exactly: area at radius 1, bounding-box fill, solidity, hull corners."""

    unit_area: float
    fill: float
    solidity: float
    corners: int


@dataclass(frozen=True)
class Measurement:
    """One object region: its measured geometry and colour."""

    area: int
    fill: float
    solidity: float
    corners: int
    centre: tuple[float, float]  # bounding-box centre, in units of the image side
    hue: float  # degrees
    rgb: tuple[float, float, float]


def _shoelace(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _polygon_geometry(vertices: np.ndarray, hull: np.ndarray) -> ShapeGeometry:
    area = _shoelace(vertices)
    width, height = vertices.max(axis=0) - vertices.min(axis=0)
    return ShapeGeometry(area, area / (width * height), area / _shoelace(hull), len(hull))


@functools.lru_cache(maxsize=1)
def shape_geometry() -> dict[str, ShapeGeometry]:
    """Each shape's exact measurements, from the outlines the renderer draws."""
    side = 2 * shapes._SQUARE_HALF_SIDE
    star = shapes._STAR
    return {
        "circle": ShapeGeometry(math.pi, math.pi / 4, 1.0, MANY_CORNERS),
        "square": ShapeGeometry(side * side, 1.0, 1.0, 4),
        "triangle": _polygon_geometry(shapes._TRIANGLE, shapes._TRIANGLE),
        "star": _polygon_geometry(star, star[::2]),  # the hull of a star is the pentagon of its points
    }


# ----------------------------------------------------------------------------------------------
# Segmentation

def _background(image: np.ndarray) -> str:
    """The background colour nearest the median of the image's border pixels."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    median = np.median(border, axis=0)
    return min(BACKGROUND_RGB, key=lambda name: np.linalg.norm(median - BACKGROUND_RGB[name]))


def _neighbourhood_max(array: np.ndarray) -> np.ndarray:
    """Each pixel's largest value over itself and its 8 neighbours."""
    height, width = array.shape
    padded = np.pad(array, 1)
    return np.max([padded[dr:dr + height, dc:dc + width] for dr in range(3) for dc in range(3)], axis=0)


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean mask, each as an (N, 2) array of (row, column)."""
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    # Every pixel takes the largest label of its neighbourhood until none changes: one label per region.
    while True:
        spread = np.where(mask, _neighbourhood_max(labels), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    return [np.argwhere(labels == label) for label in np.unique(labels[mask])]


# ----------------------------------------------------------------------------------------------
# Measuring one region

def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull of 2-D points (monotone chain), without collinear points."""
    points = sorted({(float(x), float(y)) for x, y in points})
    if len(points) < 3:
        return np.asarray(points)

    def turns_left(o, a, b) -> bool:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]) > 0

    def half(sequence) -> list:
        chain: list = []
        for point in sequence:
            while len(chain) >= 2 and not turns_left(chain[-2], chain[-1], point):
                chain.pop()
            chain.append(point)
        return chain[:-1]

    return np.asarray(half(points) + half(points[::-1]))


def _corner_count(hull: np.ndarray) -> int:
    """Corners left once the hull drops, one at a time, the vertex whose removal loses least area,
    until the next removal would take the total loss past HULL_AREA_TOLERANCE."""
    budget = HULL_AREA_TOLERANCE * _shoelace(hull)
    vertices, lost = hull, 0.0
    while len(vertices) > 3:
        before, after = np.roll(vertices, 1, axis=0) - vertices, np.roll(vertices, -1, axis=0) - vertices
        # Removing a vertex cuts off the triangle it makes with its neighbours.
        losses = 0.5 * np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0])
        cheapest = int(np.argmin(losses))
        if lost + losses[cheapest] > budget:
            break
        lost += losses[cheapest]
        vertices = np.delete(vertices, cheapest, axis=0)
    return min(len(vertices), MANY_CORNERS)


def _outline_points(region: np.ndarray) -> np.ndarray:
    """(x, y) corners of the first and last pixel of every row of a region: the hull of these is
    the hull of all its pixels (each a unit square)."""
    rows = region[:, 0]
    order = np.lexsort((region[:, 1], rows))
    rows_sorted, columns = rows[order], region[order, 1]
    starts = np.r_[0, np.nonzero(np.diff(rows_sorted))[0] + 1]
    ends = np.r_[starts[1:], len(rows_sorted)] - 1
    row_of = rows_sorted[starts].astype(np.float64)
    first, last = columns[starts].astype(np.float64), columns[ends].astype(np.float64) + 1
    xs = np.concatenate([first, first, last, last])
    ys = np.concatenate([row_of, row_of + 1, row_of, row_of + 1])
    return np.stack([xs, ys], axis=1)


def _hue(rgb: np.ndarray) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(rgb / 255.0))[0]


def _coverage(image: np.ndarray, region: np.ndarray, background_rgb: np.ndarray) -> np.ndarray:
    """How much of each pixel the region's object covers, 0 to 1: its distance from the background
    over the object's own (median) distance, on the region and the ring of pixels around it that no
    other object claims.

    An edge crossing a pixel row leaves that row part-covered; thresholded, such a row comes out
    ragged (some pixels just above the cut, some just below), which turns a small square's
    bounding-box fill from 1.0 to as low as 0.8, a circle's. Summed as fractions, the row counts
    for what it covers.
    """
    distance = np.linalg.norm(image.astype(np.float64) - background_rgb, axis=2)
    own = np.zeros(distance.shape, dtype=bool)
    own[region[:, 0], region[:, 1]] = True
    ring = _neighbourhood_max(own) & (distance <= FOREGROUND_DISTANCE)
    contrast = max(float(np.median(distance[own])), FOREGROUND_DISTANCE)
    return np.where(own | ring, np.clip(distance / contrast, 0.0, 1.0), 0.0)


def _soft_fill(coverage: np.ndarray) -> float:
    """Covered area over the bounding box, each side measured as the sum over its rows (columns) of
    the most any pixel there is covered."""
    width, height = coverage.max(axis=0).sum(), coverage.max(axis=1).sum()
    return float(coverage.sum() / max(width * height, 1.0))


def measure_region(image: np.ndarray, region: np.ndarray, background: str | None = None) -> Measurement:
    """Measure one region of ``image`` (rows and columns of its pixels) on ``background`` (by
    default the one its border shows)."""
    side = image.shape[0]
    background_rgb = np.asarray(BACKGROUND_RGB[background or _background(image)], dtype=np.float64)
    top, left = region.min(axis=0)
    bottom, right = region.max(axis=0) + 1
    hull = _convex_hull(_outline_points(region))
    area = len(region)
    rgb = np.median(image[region[:, 0], region[:, 1]].astype(np.float64), axis=0)
    return Measurement(
        area=area,
        fill=_soft_fill(_coverage(image, region, background_rgb)),
        solidity=area / max(_shoelace(hull), 1.0),
        corners=_corner_count(hull),
        centre=((left + right) / 2 / side, (top + bottom) / 2 / side),
        hue=_hue(rgb),
        rgb=tuple(rgb),
    )


# ----------------------------------------------------------------------------------------------
# Verdicts

def shape_verdict(measurement: Measurement) -> str:
    """The shape whose exact fill, solidity and corner count lie nearest the measured ones.

    Fill and solidity weigh most (they hold at every size); corners, which pixelation blurs on
    small objects, settle what those leave close.
    """
    def distance(name: str) -> float:
        expected = shape_geometry()[name]
        corner_gap = abs(min(measurement.corners, MANY_CORNERS) - expected.corners) / MANY_CORNERS
        return (abs(measurement.fill - expected.fill) + abs(measurement.solidity - expected.solidity)
                + 0.25 * corner_gap)

    return min(SHAPES, key=distance)


def colour_verdict(measurement: Measurement) -> str:
    """The object colour with the nearest hue (on the colour wheel)."""
    def gap(name: str) -> float:
        difference = abs(measurement.hue - _hue(np.asarray(COLOUR_RGB[name], dtype=np.float64))) % 360.0
        return min(difference, 360.0 - difference)

    return min(COLOUR_RGB, key=gap)


def size_verdict(measurement: Measurement, shape: str, side: int) -> str:
    """The size whose radius is nearest (in ratio) the radius the area implies for ``shape``."""
    radius = math.sqrt(measurement.area / shape_geometry()[shape].unit_area) / side
    return min(SIZE_RADII, key=lambda size: abs(math.log(radius / SIZE_RADII[size])))


def position_verdict(measurement: Measurement) -> str:
    return min(POSITION_CENTERS, key=lambda name: math.dist(measurement.centre, POSITION_CENTERS[name]))


def _smallest_object_area(side: int) -> float:
    smallest = min(geometry.unit_area for geometry in shape_geometry().values())
    return smallest * (min(SIZE_RADII.values()) * side) ** 2


def read_scene_geometrically(image: np.ndarray) -> SceneReading:
    """Read an (H, W, 3) uint8 image: its background and every object region, in POSITIONS order."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square (H, W, 3) image, got shape {image.shape}")
    background = _background(image)
    distance = np.linalg.norm(image.astype(np.float64) - BACKGROUND_RGB[background], axis=2)
    side = image.shape[0]
    objects = []
    for region in _regions(distance > FOREGROUND_DISTANCE):
        if len(region) < MIN_OBJECT_SHARE * _smallest_object_area(side):
            continue
        measurement = measure_region(image, region, background)
        shape = shape_verdict(measurement)
        objects.append(ShapeObject(shape, colour_verdict(measurement), size_verdict(measurement, shape, side),
                                   position_verdict(measurement)))
    objects.sort(key=lambda obj: shapes.POSITIONS.index(obj.position))
    return SceneReading(tuple(objects), background)
