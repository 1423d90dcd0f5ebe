"""Shapes-world captions as people write them, and what such a caption asks of an image.

The grammar of data/shapes.py states everything in fixed phrases. People leave things out ("a red
circle": no place, no background), count ("two blue squares", "a pair of stars"), list ("a red
circle and a blue square", three objects), use other relation words ("next to", "under", "on top
of"), plurals, synonyms, capitals and punctuation. :func:`describe` writes such captions for
scenes (training data, opt-in); :func:`read_description` reads them back to a
:class:`Description`, which holds only what the caption states, so an image is judged
(:func:`score_description`) on that and nothing else.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from latent_diffusion.data.shapes import (
    DEFAULT_BACKGROUND, DEFAULT_SIZE, RELATION_POSITIONS, THREE_OBJECT_LAYOUTS, THREE_OBJECT_SIZE,
    CaptionError, Scene, ShapeObject, parse_caption,
)

# Each grammar word with the words people also use for it (the grammar's own first).
SHAPE_WORDS = {"circle": ("circle", "disc", "dot"), "square": ("square", "box"), "triangle": ("triangle",),
               "star": ("star",)}
COLOUR_WORDS = {"red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
                "purple": ("purple", "violet"), "orange": ("orange",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUND_WORDS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
BESIDE = "beside"  # a stated horizontal pair, in either order
BESIDE_WORDS = ("next to", "beside")
PLACE_WORDS = {
    "left": ("on the left",), "right": ("on the right",), "top": ("at the top",), "bottom": ("at the bottom",),
    "center": ("in the center", "in the centre", "in the middle"),
}
COUNT_WORDS = {1: ("a", "an", "one"), 2: ("two", "a pair of"), 3: ("three",)}


@dataclass(frozen=True)
class ObjectDescription:
    """One object as a caption states it: size and position None when it does not say."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Description:
    """What a caption asks for: its objects, and the background and relation when stated.

    ``relation``: one of RELATIONS (the first object is placed so relative to the second), BESIDE,
    a key of THREE_OBJECT_LAYOUTS, or None (a list or a count: anywhere).
    """

    objects: tuple[ObjectDescription, ...]
    background: str | None = None
    relation: str | None = None


# ----------------------------------------------------------------------------------------------
# Writing

def _choice(rng: np.random.Generator, options):
    options = list(options)
    return options[rng.integers(len(options))]


def _noun(obj: ShapeObject, rng: np.random.Generator, *, plural: bool = False) -> str:
    words = [_choice(rng, SIZE_WORDS[obj.size])] if rng.random() < 0.5 else []
    noun = _choice(rng, SHAPE_WORDS[obj.shape])
    words += [_choice(rng, COLOUR_WORDS[obj.colour]), _plural(noun) if plural else noun]
    return " ".join(words)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("x") else "s")


def _with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _same_kind(objects) -> bool:
    return len({(obj.shape, obj.colour, obj.size) for obj in objects}) == 1


# Where an object stands in reading order: the top row first, then left to right.
_READING_ORDER = {"top": 0, "left": 1, "center": 2, "right": 3, "bottom": 4}


def _body(scene: Scene, rng: np.random.Generator, reading_order: bool, beside_share: float | None) -> str:
    objects = scene.objects
    if len(objects) == 1:
        place = f" {_choice(rng, PLACE_WORDS[objects[0].position])}" if rng.random() < 0.5 else ""
        return _with_article(_noun(objects[0], rng)) + place
    if _same_kind(objects) and rng.random() < 0.5:
        count = _choice(rng, COUNT_WORDS[len(objects)])
        return f"{count} {_noun(objects[0], rng, plural=True)}"
    nouns = [_with_article(_noun(obj, rng)) for obj in objects]
    if len(objects) == 3:
        layout = f" {scene.relation}" if rng.random() < 0.5 else ""
        return f"{nouns[0]}, {nouns[1]} and {nouns[2]}{layout}"
    kind = rng.integers(3)  # drawn in any case, so that without beside_share the numbers stay as they were
    if beside_share is not None and scene.relation in ("left of", "right of"):
        kind = 1 if rng.random() < beside_share else _choice(rng, (0, 2))
    if kind == 0:
        if reading_order:
            nouns = [noun for _, noun in sorted(zip((_READING_ORDER[o.position] for o in objects), nouns))]
        return f"{nouns[0]} and {nouns[1]}"
    if kind == 1 and scene.relation in ("left of", "right of"):
        return f"{nouns[0]} {_choice(rng, BESIDE_WORDS)} {nouns[1]}"
    return f"{nouns[0]} {_choice(rng, RELATION_WORDS[scene.relation])} {nouns[1]}"


def describe(scene: Scene, rng: np.random.Generator, *, reading_order: bool = False,
             beside_share: float | None = None) -> str:
    """A caption of ``scene`` as a person might write it: true of the scene, silent on some of it.

    ``reading_order`` names the two objects of an "X and Y" caption as one reads the image (the upper
    or left one first) rather than in the scene's order; the words drawn are the same. A caption then
    says which object goes where in the convention three-object lists already follow (their layouts
    run left to right and top to bottom), which a model can learn where a random order leaves it to
    pair each object's words with a place of its own choosing (MODEL_CARD.md, version 5).

    ``beside_share``: the chance that a side-by-side pair of objects is written "X beside Y" (or "next
    to"), rather than a third of the time. "beside" states no order, only that the pair is level, so a
    model learns it from fewer cues than "left of" and may need to see it more (MODEL_CARD.md, version 5:
    a first try at "beside").
    """
    text = _body(scene, rng, reading_order, beside_share)
    if scene.background != DEFAULT_BACKGROUND or rng.random() < 0.3:
        text += f" on a {_choice(rng, BACKGROUND_WORDS[scene.background])} background"
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.3 else "")


# ----------------------------------------------------------------------------------------------
# Reading

def _lookup(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: name for name, words in table.items() for word in words}


_SHAPE = _lookup(SHAPE_WORDS)
_PLURAL_SHAPE = {_plural(word): name for word, name in _SHAPE.items()}
_COLOUR, _SIZE, _BACKGROUND = _lookup(COLOUR_WORDS), _lookup(SIZE_WORDS), _lookup(BACKGROUND_WORDS)
_PLACE = _lookup(PLACE_WORDS)
_RELATION = _lookup(RELATION_WORDS) | {word: BESIDE for word in BESIDE_WORDS}
_COUNT = _lookup({count: words for count, words in COUNT_WORDS.items()})


def _alternatives(phrases) -> str:
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_BACKGROUND_PHRASE = re.compile(rf"(?:(?:on|against) an? )?({_alternatives(_BACKGROUND)}) background")
_LAYOUT_PHRASE = re.compile(rf"\b({_alternatives(THREE_OBJECT_LAYOUTS)})$")
_RELATION_PHRASE = re.compile(rf"\b({_alternatives(_RELATION)})\b")
_OBJECT_PHRASE = re.compile(
    rf"(?:({_alternatives(_COUNT)}) )?(?:({_alternatives(_SIZE)}) )?({_alternatives(_COLOUR)}) "
    rf"({_alternatives([*_SHAPE, *_PLURAL_SHAPE])})(?: ({_alternatives(_PLACE)}))?"
)


def _normalise(text: str) -> str:
    text = re.sub(r"[.!?;:]+", " ", text.lower())
    return " ".join(text.replace(",", " , ").split())


def _read_objects(phrase: str) -> list[ObjectDescription]:
    match = _OBJECT_PHRASE.fullmatch(phrase.strip(" ,"))
    if match is None:
        raise CaptionError(f"cannot read {phrase.strip(' ,')!r} as objects (e.g. 'a small red circle', 'two blue stars')")
    count_word, size, colour, shape, place = match.groups()
    count = _COUNT[count_word] if count_word else 1
    plural = shape in _PLURAL_SHAPE
    if (count > 1) != plural:
        raise CaptionError(f"{phrase.strip()!r}: a count of {count} with {'a plural' if plural else 'one'} noun")
    obj = ObjectDescription(_PLURAL_SHAPE.get(shape) or _SHAPE[shape], _COLOUR[colour], _SIZE.get(size), _PLACE.get(place))
    return [obj] * count


def read_description(caption: str) -> Description:
    """What ``caption`` asks for; CaptionError when it is outside what people write here.

    A size left out asks for either size. (The grammar's 'short' phrasing means large by it; a
    training set should not mix that phrasing with these captions.)
    """
    if not isinstance(caption, str):
        raise CaptionError(f"a caption must be a string, got {type(caption).__name__}")
    try:
        return _read_spoken(caption)
    except CaptionError as error:
        try:
            return description_of(parse_caption(caption))  # the grammar's tag-style captions
        except CaptionError:
            raise error from None


def _read_spoken(caption: str) -> Description:
    text = _normalise(caption)
    background = None
    found = _BACKGROUND_PHRASE.search(text)
    if found:
        background = _BACKGROUND[found.group(1)]
        text = re.sub(r"^with ", "", (text[:found.start()] + text[found.end():]).strip())
    relation = None
    layout = _LAYOUT_PHRASE.search(text)
    if layout:
        relation, text = layout.group(1), text[:layout.start()].strip()
    linked = _RELATION_PHRASE.search(text)
    if linked and relation is None:
        relation = _RELATION[linked.group(1)]
        parts = [text[:linked.start()], text[linked.end():]]
    else:
        parts = re.split(r" , (?:and )?| and ", text)
    objects = [obj for part in parts for obj in _read_objects(part)]
    if not 1 <= len(objects) <= 3:
        raise CaptionError(f"caption {caption!r} asks for {len(objects)} objects; the shapes world holds one to three")
    if relation in THREE_OBJECT_LAYOUTS and len(objects) != 3:
        raise CaptionError(f"caption {caption!r}: {relation!r} needs three objects")
    if relation is not None and relation not in THREE_OBJECT_LAYOUTS and len(objects) != 2:
        raise CaptionError(f"caption {caption!r}: a relation links two objects")
    return Description(tuple(objects), background, relation)


# ----------------------------------------------------------------------------------------------
# Judging an image's reading against a description

def stated_positions(description: Description) -> list[tuple[str | None, ...]]:
    """Every assignment of positions to the described objects that the caption allows."""
    own = tuple(obj.position for obj in description.objects)
    relation = description.relation
    if relation in RELATION_POSITIONS:
        return [RELATION_POSITIONS[relation]]
    if relation == BESIDE:
        return [("left", "right"), ("right", "left")]
    if relation in THREE_OBJECT_LAYOUTS:
        return [tuple(p) for p in itertools.permutations(THREE_OBJECT_LAYOUTS[relation])]
    return [own]


def _object_hits(wanted: ObjectDescription, position: str | None, seen: ShapeObject | None) -> dict[str, bool | None]:
    """Per attribute: True/False, or None where the caption does not say."""
    def hit(name: str, value) -> bool | None:
        return None if value is None else seen is not None and getattr(seen, name) == value

    return {"shape": hit("shape", wanted.shape), "colour": hit("colour", wanted.colour),
            "size": hit("size", wanted.size), "position": hit("position", position)}


def score_description(objects: tuple[ShapeObject, ...], background: str, description: Description) -> dict[str, list[bool]]:
    """Hits of a reading (its objects and background) for what ``description`` states, in the keys of
    the grammar's scoring (shape, colour, size, position, background, count, scene); what the
    caption leaves unsaid is not scored."""
    found: list[ShapeObject | None] = list(objects) + [None] * max(len(description.objects) - len(objects), 0)
    best, best_total = None, -1
    for positions in stated_positions(description):
        for chosen in itertools.permutations(range(len(found)), len(description.objects)):
            hits = [_object_hits(w, p, found[slot]) for w, p, slot in zip(description.objects, positions, chosen)]
            total = sum(value is True for h in hits for value in h.values())
            if total > best_total:
                best, best_total = hits, total
    scored = {name: [h[name] for h in best if h[name] is not None] for name in ("shape", "colour", "size", "position")}
    scored["background"] = [] if description.background is None else [background == description.background]
    scored["count"] = [len(objects) == len(description.objects)]
    everything = [value for values in scored.values() for value in values]
    scored["scene"] = [all(everything)]
    return scored


_DEFAULT_LAYOUTS = {1: ("center",), 2: ("left", "right"), 3: THREE_OBJECT_LAYOUTS["in a row"]}


def scene_for(description: Description) -> Scene:
    """One scene that fits ``description``: what it leaves unsaid takes the grammar's defaults (large,
    white) and places follow the relation, the stated places, or left-to-right."""
    objects, relation = description.objects, description.relation
    if relation == BESIDE:
        relation = "left of"
    positions = stated_positions(Description(objects, description.background, relation))[0]
    if None in positions:
        positions = _DEFAULT_LAYOUTS[len(objects)] if all(p is None for p in positions) else positions
    if None in positions or len(set(positions)) != len(positions):
        raise CaptionError(f"no scene of the shapes world places objects at {positions}")
    if len(objects) == 2 and relation is None:
        relation = next((r for r, places in RELATION_POSITIONS.items() if places == tuple(positions)), None)
    if len(objects) == 3 and relation is None:
        relation = next((r for r, places in THREE_OBJECT_LAYOUTS.items() if places == tuple(positions)), None)
    try:
        size = THREE_OBJECT_SIZE if len(objects) == 3 else DEFAULT_SIZE
        return Scene(tuple(ShapeObject(o.shape, o.colour, o.size or size, p) for o, p in zip(objects, positions)),
                     description.background or DEFAULT_BACKGROUND, relation)
    except ValueError as error:
        raise CaptionError(f"no scene of the shapes world fits the description: {error}") from None


def description_of(scene: Scene) -> Description:
    """The full description of a scene (everything stated), as the grammar's captions give it."""
    objects = tuple(ObjectDescription(o.shape, o.colour, o.size, o.position) for o in scene.objects)
    return Description(objects, scene.background, scene.relation)

