"""The shapes world: a procedural, captioned image dataset rendered by our own code.

A scene is one object, or two objects in a spatial relation, on a plain background. Scenes render
to anti-aliased images (analytic coverage from signed distances, so no supersampling cost) and to
captions from a small grammar; captions parse back to scenes. Everything is deterministic from a
seed, so the dataset needs no files on disk.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("white", "black", "gray")
RELATIONS = ("left of", "right of", "above", "below")
PHRASINGS = ("natural", "short", "tags", "background_first")

# Pairs that the training sampler never produces, to measure compositional generalisation. One per
# shape and at most one per colour, so every shape and every colour is still seen three or five times.
HELD_OUT_PAIRS = frozenset({("purple", "star"), ("orange", "triangle"), ("green", "circle"), ("yellow", "square")})

# Two-object scenes place the objects so that relation and positions always agree.
RELATION_POSITIONS = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}

# Three-object scenes (opt-in, see sample_scene) stand in a row or a column through the centre.
# Three objects fit only when small and spread further out than POSITION_CENTERS places them.
THREE_OBJECT_LAYOUTS = {
    "in a row": ("left", "center", "right"),
    "in a column": ("top", "center", "bottom"),
}
THREE_OBJECT_SIZE = "small"
THREE_OBJECT_CENTERS = {"left": (1 / 6, 0.5), "right": (5 / 6, 0.5), "top": (0.5, 1 / 6), "bottom": (0.5, 5 / 6),
                        "center": (0.5, 0.5)}

# Canvas geometry in units of the image side, independent of resolution.
POSITION_CENTERS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
SIZE_RADII = {"small": 0.095, "large": 0.17}

COLOUR_RGB = {
    "red": (215, 38, 38),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 180),
    "orange": (245, 130, 20),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

DEFAULT_BACKGROUND = "white"
DEFAULT_SIZE = "large"  # what a caption without a size word means


def _check_word(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class ShapeObject:
    """One coloured shape at one of the five canvas positions."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.colour, COLOURS, "colour")
        _check_word(self.size, SIZES, "size")
        _check_word(self.position, POSITIONS, "position")

    @property
    def noun_phrase(self) -> str:
        """'large red circle'."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def is_held_out(self) -> bool:
        """Whether its colour-shape pair is withheld from training."""
        return (self.colour, self.shape) in HELD_OUT_PAIRS


@dataclass(frozen=True)
class Scene:
    """A scene spec: one object, two objects whose positions follow from their relation, or three
    in a row or column (``relation`` is then the layout, a key of THREE_OBJECT_LAYOUTS)."""

    objects: tuple[ShapeObject, ...]
    background: str = DEFAULT_BACKGROUND
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_word(self.background, BACKGROUNDS, "background")
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError(f"a one-object scene has no relation, got {self.relation!r}")
        elif len(self.objects) == 2:
            if self.relation is None:
                raise ValueError("a two-object scene needs a relation")
            _check_word(self.relation, RELATIONS, "relation")
            expected = RELATION_POSITIONS[self.relation]
            actual = tuple(obj.position for obj in self.objects)
            if actual != expected:
                raise ValueError(
                    f"relation {self.relation!r} puts the objects at {expected}, but they are at {actual}"
                )
        elif len(self.objects) == 3:
            _check_word(self.relation, tuple(THREE_OBJECT_LAYOUTS), "three-object layout")
            actual = tuple(obj.position for obj in self.objects)
            if actual != THREE_OBJECT_LAYOUTS[self.relation]:
                raise ValueError(f"layout {self.relation!r} puts the objects at {THREE_OBJECT_LAYOUTS[self.relation]}, "
                                 f"but they are at {actual}")
            if any(obj.size != THREE_OBJECT_SIZE for obj in self.objects):
                raise ValueError(f"three objects fit the canvas only when {THREE_OBJECT_SIZE}")
        else:
            raise ValueError(f"a scene has one or two objects (or three in a row or column), got {len(self.objects)}")

    @classmethod
    def single(cls, shape: str, colour: str, size: str, position: str, background: str = DEFAULT_BACKGROUND) -> Scene:
        """A one-object scene."""
        return cls((ShapeObject(shape, colour, size, position),), background)

    @classmethod
    def pair(
        cls, first: ShapeObject, relation: str, second: ShapeObject, background: str = DEFAULT_BACKGROUND
    ) -> Scene:
        """'first RELATION second'; the objects' own positions are replaced by the ones the relation implies."""
        _check_word(relation, RELATIONS, "relation")
        first_position, second_position = RELATION_POSITIONS[relation]
        return cls(
            (dataclasses.replace(first, position=first_position), dataclasses.replace(second, position=second_position)),
            background,
            relation,
        )

    @property
    def has_held_out_pair(self) -> bool:
        """Whether any object uses a withheld colour-shape pair."""
        return any(obj.is_held_out for obj in self.objects)


# ----------------------------------------------------------------------------------------------
# Rendering

@dataclass(frozen=True)
class RenderJitter:
    """Per-object random variation: centre offset (fraction of the side) and relative scale."""

    position: float = 0.02
    scale: float = 0.08

    def __post_init__(self) -> None:
        # Beyond these the objects could leave the canvas or touch each other.
        if not 0.0 <= self.position <= 0.025 or not 0.0 <= self.scale <= 0.1:
            raise ValueError(f"jitter must satisfy 0 <= position <= 0.025 and 0 <= scale <= 0.1, got {self}")


NO_JITTER = RenderJitter(0.0, 0.0)


def _regular_polygon(corners: int, outer: float, inner: float | None) -> np.ndarray:
    """Vertices of a point-up regular polygon (or star when inner is given), bounding box centred at 0."""
    if inner is None:
        angles = np.pi / 2 + 2 * np.pi * np.arange(corners) / corners
        radii = np.full(corners, outer)
    else:
        angles = np.pi / 2 + np.pi * np.arange(2 * corners) / corners
        radii = np.where(np.arange(2 * corners) % 2 == 0, outer, inner)
    # Image rows grow downwards, hence the minus on y.
    vertices = np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)
    return vertices - (vertices.max(axis=0) + vertices.min(axis=0)) / 2


# Outlines at radius 1; sized so that the four shapes cover similar areas.
_TRIANGLE = _regular_polygon(3, 1.25, None)
_STAR = _regular_polygon(5, 1.25, 0.5)
_SQUARE_HALF_SIDE = 0.88


def _polygon_signed_distance(px: np.ndarray, py: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside), by nearest edge and crossing parity."""
    start = vertices
    end = np.roll(vertices, -1, axis=0)
    edge = end - start
    wx = px[..., None] - start[:, 0]
    wy = py[..., None] - start[:, 1]
    t = np.clip((wx * edge[:, 0] + wy * edge[:, 1]) / (edge ** 2).sum(axis=1), 0.0, 1.0)
    distance = np.sqrt(((wx - edge[:, 0] * t) ** 2 + (wy - edge[:, 1] * t) ** 2).min(axis=-1))
    straddles = (start[:, 1] > py[..., None]) != (end[:, 1] > py[..., None])
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing_x = start[:, 0] + edge[:, 0] * (py[..., None] - start[:, 1]) / edge[:, 1]
    inside = (straddles & (px[..., None] < crossing_x)).sum(axis=-1) % 2 == 1
    return np.where(inside, -distance, distance)


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance of points (in units of the object radius, centred on it) to the outline."""
    if shape == "circle":
        return np.sqrt(px ** 2 + py ** 2) - 1.0
    if shape == "square":
        qx = np.abs(px) - _SQUARE_HALF_SIDE
        qy = np.abs(py) - _SQUARE_HALF_SIDE
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    if shape == "triangle":
        return _polygon_signed_distance(px, py, _TRIANGLE)
    if shape == "star":
        return _polygon_signed_distance(px, py, _STAR)
    raise ValueError(f"unknown shape {shape!r}")


def _paint_object(canvas: np.ndarray, obj: ShapeObject, center: tuple[float, float], radius: float) -> None:
    """Blend one object into an (H, W, 3) float canvas in place, with analytic edge coverage."""
    resolution = canvas.shape[0]
    radius_px = radius * resolution
    cx, cy = center[0] * resolution, center[1] * resolution
    # 1.3 radii bounds every outline; one extra pixel holds the anti-aliased fringe.
    reach = 1.3 * radius_px + 1.0
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)), resolution)
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)), resolution)
    if x0 >= x1 or y0 >= y1:
        return
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    distance_px = _signed_distance(obj.shape, (px - cx) / radius_px, (py - cy) / radius_px) * radius_px
    # A straight edge through a pixel covers it linearly in the distance from its centre: a one-pixel ramp.
    coverage = np.clip(0.5 - distance_px, 0.0, 1.0)[..., None]
    colour = np.asarray(COLOUR_RGB[obj.colour], dtype=np.float64) / 255.0
    region = canvas[y0:y1, x0:x1]
    region += coverage * (colour - region)


def render_scene(
    scene: Scene, resolution: int = 64, *, seed: int | None = None, jitter: RenderJitter = NO_JITTER
) -> np.ndarray:
    """Render a scene to an (H, W, 3) uint8 array; `seed` drives the jitter, so equal seeds give equal pixels."""
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    rng = np.random.default_rng(seed)
    canvas = np.empty((resolution, resolution, 3), dtype=np.float64)
    canvas[:] = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float64) / 255.0
    centers = THREE_OBJECT_CENTERS if len(scene.objects) == 3 else POSITION_CENTERS
    for obj in scene.objects:
        offset = rng.uniform(-1.0, 1.0, size=2) * jitter.position
        scale = 1.0 + rng.uniform(-1.0, 1.0) * jitter.scale
        base_x, base_y = centers[obj.position]
        _paint_object(canvas, obj, (base_x + offset[0], base_y + offset[1]), SIZE_RADII[obj.size] * scale)
    return np.round(canvas * 255.0).astype(np.uint8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return array.permute(1, 2, 0).numpy()


def downsample(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Area-average (3, H, W) or (B, 3, H, W) images to size x size: the low-res input of a super-resolution model."""
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) images, got shape {tuple(images.shape)}")
    batched = images if images.ndim == 4 else images[None]
    if batched.shape[-1] % size or batched.shape[-2] % size:
        raise ValueError(f"image size {tuple(batched.shape[-2:])} is not a multiple of {size}")
    small = F.avg_pool2d(batched, kernel_size=(batched.shape[-2] // size, batched.shape[-1] // size))
    return small if images.ndim == 4 else small[0]


# ----------------------------------------------------------------------------------------------
# Caption grammar

_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


def caption_for(scene: Scene, phrasing: str = "natural") -> str:
    """The scene's caption in one of PHRASINGS; 'short' leaves out the defaults (large, white background).

    So the model also learns what a caption that leaves size or background unsaid means, as in
    "a red circle left of a blue square".
    """
    _check_word(phrasing, PHRASINGS, "phrasing")
    if len(scene.objects) > 2:
        raise ValueError("the grammar captions one- and two-object scenes; shapes_speech.describe captions three")
    short = phrasing == "short"

    def noun(obj: ShapeObject) -> str:
        return f"{obj.colour} {obj.shape}" if short and obj.size == DEFAULT_SIZE else obj.noun_phrase

    background_phrase = f"on a {scene.background} background"
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        where = _POSITION_PHRASES[obj.position]
        if phrasing == "tags":
            return f"{noun(obj)}, {obj.position}, {scene.background} background"
        if phrasing == "background_first":
            return f"a {scene.background} background with a {noun(obj)} {where}"
        body = f"a {noun(obj)} {where}"
    else:
        first, second = scene.objects
        if phrasing == "tags":
            return f"{noun(first)}, {scene.relation}, {noun(second)}, {scene.background} background"
        if phrasing == "background_first":
            return f"a {scene.background} background with a {noun(first)} {scene.relation} a {noun(second)}"
        body = f"a {noun(first)} {scene.relation} a {noun(second)}"
    if short and scene.background == DEFAULT_BACKGROUND:
        return body
    return f"{body} {background_phrase}"


def captions_for(scene: Scene) -> list[str]:
    """Every distinct caption the grammar gives the scene."""
    return list(dict.fromkeys(caption_for(scene, phrasing) for phrasing in PHRASINGS))


def grammar_captions() -> list[str]:
    """Captions that between them use every word and symbol the grammar's captions can hold: every
    one-object scene in every phrasing, and one two-object scene per relation and background."""
    scenes = [Scene.single(shape, colour, size, position, background)
              for shape in SHAPES for colour in COLOURS for size in SIZES for position in POSITIONS
              for background in BACKGROUNDS]
    for relation in RELATIONS:
        for background in BACKGROUNDS:
            for size in SIZES:
                obj = ShapeObject(SHAPES[0], COLOURS[0], size, "center")
                scenes.append(Scene.pair(obj, relation, obj, background))
    return list(dict.fromkeys(caption for scene in scenes for caption in captions_for(scene)))


class CaptionError(ValueError):
    """A caption outside the shapes grammar."""


def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


def _object_pattern(prefix: str) -> str:
    # The size may be left out (it then means DEFAULT_SIZE).
    return (
        f"(?:(?P<{prefix}size>{_alternatives(SIZES)}) )?(?P<{prefix}colour>{_alternatives(COLOURS)}) "
        f"(?P<{prefix}shape>{_alternatives(SHAPES)})"
    )


_PLACE_TO_POSITION = {phrase: position for position, phrase in _POSITION_PHRASES.items()}
_OBJECT = _object_pattern("a_")
_SECOND = _object_pattern("b_")
_PLACE = f"(?P<place>{_alternatives(list(_PLACE_TO_POSITION))})"
_POSITION_TAG = f"(?P<position>{_alternatives(POSITIONS)})"
_BACKGROUND = f"(?P<background>{_alternatives(BACKGROUNDS)})"
_RELATION = f"(?P<relation>{_alternatives(RELATIONS)})"
_GRAMMAR = [
    re.compile(pattern)
    for pattern in (
        f"a {_OBJECT} {_PLACE}(?: on a {_BACKGROUND} background)?",
        f"{_OBJECT}, {_POSITION_TAG}, {_BACKGROUND} background",
        f"a {_BACKGROUND} background with a {_OBJECT} {_PLACE}",
        f"a {_OBJECT} {_RELATION} a {_SECOND}(?: on a {_BACKGROUND} background)?",
        f"{_OBJECT}, {_RELATION}, {_SECOND}, {_BACKGROUND} background",
        f"a {_BACKGROUND} background with a {_OBJECT} {_RELATION} a {_SECOND}",
    )
]
# British spellings are read as the grammar's own words.
_SYNONYMS = {"grey": "gray", "centre": "center"}
_VOCABULARY = frozenset(
    word
    for phrase in (*SHAPES, *COLOURS, *SIZES, *POSITIONS, *BACKGROUNDS, *RELATIONS, *_POSITION_PHRASES.values())
    for word in phrase.split()
) | {"a", "on", "background", "with"}


def _normalise_caption(caption: str) -> str:
    text = " ".join(caption.lower().replace(",", ", ").split()).replace(" ,", ",").rstrip(".").strip()
    return " ".join(_SYNONYMS.get(word, word) for word in text.split(" "))


def parse_caption(caption: str) -> Scene:
    """Read a caption back to its scene; raises CaptionError for captions outside the grammar."""
    if not isinstance(caption, str):
        raise CaptionError(f"a caption must be a string, got {type(caption).__name__}")
    text = _normalise_caption(caption)
    for pattern in _GRAMMAR:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        fields = match.groupdict()
        background = fields["background"] or DEFAULT_BACKGROUND
        first = (fields["a_shape"], fields["a_colour"], fields["a_size"] or DEFAULT_SIZE)
        if fields.get("relation") is None:
            position = fields.get("position") or _PLACE_TO_POSITION[fields["place"]]
            return Scene.single(*first, position, background)
        relation = fields["relation"]
        first_position, second_position = RELATION_POSITIONS[relation]
        return Scene(
            (
                ShapeObject(*first, first_position),
                ShapeObject(fields["b_shape"], fields["b_colour"], fields["b_size"] or DEFAULT_SIZE, second_position),
            ),
            background,
            relation,
        )
    unknown = sorted({word.strip(",") for word in text.split()} - _VOCABULARY - {""})
    reason = f"unknown word(s) {', '.join(map(repr, unknown))}" if unknown else "the words are not in a known order"
    raise CaptionError(
        f"caption {caption!r} is outside the shapes grammar: {reason}; captions look like "
        f"'a large red circle on the left', 'a small blue triangle above a yellow square on a black background' "
        f"or 'large red circle, left, black background'"
    )


# ----------------------------------------------------------------------------------------------
# Sampling and the dataset

SPLITS = ("train", "held_out", "all")


def allowed_pairs(split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from: training excludes HELD_OUT_PAIRS, 'held_out' has only them."""
    _check_word(split, SPLITS, "split")
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    if split == "train":
        return [pair for pair in pairs if pair not in HELD_OUT_PAIRS]
    if split == "held_out":
        return sorted(HELD_OUT_PAIRS)
    return pairs


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_probability: float = 0.5,
                 three_object_probability: float = 0.0, same_kind_probability: float = 0.0) -> Scene:
    """Draw a random scene whose colour-shape pairs all come from `split`.

    ``three_object_probability`` (opt-in) is the share of three-object scenes; the rest split as
    ``two_object_probability`` says. ``same_kind_probability`` (opt-in) is the share of two- and
    three-object scenes whose objects are all alike (what "two red circles" shows). At 0 the draws
    are exactly those of the one- and two-object world.
    """
    for name, value in (("two_object_probability", two_object_probability),
                        ("three_object_probability", three_object_probability),
                        ("same_kind_probability", same_kind_probability)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    scene = _sample_scene(rng, split, two_object_probability, three_object_probability)
    if same_kind_probability > 0 and len(scene.objects) > 1 and rng.random() < same_kind_probability:
        first = scene.objects[0]
        alike = tuple(dataclasses.replace(first, position=obj.position) for obj in scene.objects)
        return dataclasses.replace(scene, objects=alike)
    return scene


def _sample_scene(rng: np.random.Generator, split: str, two_object_probability: float,
                  three_object_probability: float) -> Scene:
    pairs = allowed_pairs(split)

    def draw(position: str, size: str | None = None) -> ShapeObject:
        colour, shape = pairs[rng.integers(len(pairs))]
        return ShapeObject(shape, colour, size or SIZES[rng.integers(len(SIZES))], position)

    if three_object_probability > 0 and rng.random() < three_object_probability:
        layout = list(THREE_OBJECT_LAYOUTS)[rng.integers(len(THREE_OBJECT_LAYOUTS))]
        objects = tuple(draw(position, THREE_OBJECT_SIZE) for position in THREE_OBJECT_LAYOUTS[layout])
        return Scene(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], layout)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if rng.random() < two_object_probability:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        first_position, second_position = RELATION_POSITIONS[relation]
        return Scene((draw(first_position), draw(second_position)), background, relation)
    return Scene((draw(POSITIONS[rng.integers(len(POSITIONS))]),), background)


class ShapesSample(NamedTuple):
    """One dataset item: image (3, H, W) float in [-1, 1], its caption and its scene spec."""

    image: torch.Tensor
    caption: str
    scene: Scene


class ShapesDataset(torch.utils.data.Dataset):
    """A deterministic map-style dataset: item i of seed s is the same everywhere, rendered on demand."""

    def __init__(
        self,
        length: int,
        *,
        seed: int = 0,
        split: str = "train",
        resolution: int = 64,
        two_object_probability: float = 0.5,
        jitter: RenderJitter = RenderJitter(),
        phrasings: Sequence[str] = PHRASINGS,
        three_object_probability: float = 0.0,
        spoken_share: float = 0.0,
        same_kind_probability: float = 0.0,
        lists_in_reading_order: bool = False,
        beside_share: float | None = None,
    ) -> None:
        """``three_object_probability``, ``same_kind_probability`` (see sample_scene) and
        ``spoken_share`` (the share of captions written as people write them, shapes_speech.describe)
        are opt-in: at 0 every item is what it always was. ``lists_in_reading_order``: those captions
        name the objects of "X and Y" in reading order (describe's ``reading_order``); ``beside_share``
        is describe's too (None: its own mix)."""
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        _check_word(split, SPLITS, "split")
        for phrasing in phrasings:
            _check_word(phrasing, PHRASINGS, "phrasing")
        if not phrasings:
            raise ValueError("at least one phrasing is needed")
        self.length = length
        self.seed = seed
        self.split = split
        self.resolution = resolution
        self.two_object_probability = two_object_probability
        self.jitter = jitter
        self.phrasings = tuple(phrasings)
        if not 0.0 <= spoken_share <= 1.0:
            raise ValueError(f"spoken_share must be in [0, 1], got {spoken_share}")
        if three_object_probability > 0 and spoken_share == 0:
            raise ValueError("three-object scenes have no caption in the grammar; give spoken_share > 0 too")
        if beside_share is not None and not 0.0 <= beside_share <= 1.0:
            raise ValueError(f"beside_share must be in [0, 1], got {beside_share}")
        self.three_object_probability = three_object_probability
        self.spoken_share = spoken_share
        self.same_kind_probability = same_kind_probability
        self.lists_in_reading_order = lists_in_reading_order
        self.beside_share = beside_share

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, str, int]:
        """The scene, caption and render seed of item `index`, without rendering."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, index])
        scene = sample_scene(rng, self.split, self.two_object_probability, self.three_object_probability,
                             self.same_kind_probability)
        # Without the opt-in options no extra number is drawn, so items stay as they were.
        if self.spoken_share > 0 and (len(scene.objects) == 3 or rng.random() < self.spoken_share):
            from latent_diffusion.data.shapes_speech import describe

            caption = describe(scene, rng, reading_order=self.lists_in_reading_order, beside_share=self.beside_share)
        else:
            caption = caption_for(scene, self.phrasings[rng.integers(len(self.phrasings))])
        return scene, caption, int(rng.integers(2**63 - 1))

    def __getitem__(self, index: int) -> ShapesSample:
        scene, caption, render_seed = self.scene(index)
        image = render_scene(scene, self.resolution, seed=render_seed, jitter=self.jitter)
        return ShapesSample(image_to_tensor(image), caption, scene)


def collate_samples(samples: Sequence[ShapesSample]) -> ShapesSample:
    """DataLoader collate: stacked images, a list of captions and a list of scenes."""
    return ShapesSample(
        torch.stack([sample.image for sample in samples]),
        [sample.caption for sample in samples],
        [sample.scene for sample in samples],
    )
