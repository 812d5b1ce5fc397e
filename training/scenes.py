"""Procedural scenes: the fixed vocabulary, scene sampling and placement, serialisation.

Caption text lives in training/captions.py, drawing in training/render.py.

The embedded default model (weights/dcar-tiny-shapes) is trained on these scenes, and ShapesEval
(training/shapes_eval.py) scores generated images against the same vocabulary. training/VOCABULARY.md
documents every word, colour value and template; keep it in step with this file.

Every caption is true of its image: a position phrase puts the object's centre in the named third of
the image, a relation keeps a clear gap between the two bounding boxes along its axis, objects never
overlap and stay inside the frame. All randomness comes from an explicit ``np.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle")
# Saturated and far apart in RGB (closest pair: yellow/orange, ~100 apart), so a lossy reconstruction
# still lands nearest its own colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (250, 225, 20),
    "purple": (145, 45, 185),
    "orange": (245, 125, 15),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Muted colours at least ~100 RGB units from every object colour, and so is every mix of two of them,
# which keeps gradients apart from the objects too.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (205, 190, 150),
    "pink": (235, 160, 190),
    "lavender": (180, 165, 225),
    "brown": (125, 80, 50),
    "mint": (160, 220, 190),
}
SIZES = ("small", "large")
# Bounding-box side as a fraction of the image side. The tokenizer compresses 32x (an 8x8 grid at
# 256 px), so even small shapes span about two tokens.
SMALL_EXTENT = (0.15, 0.22)
LARGE_EXTENT = (0.30, 0.45)
CORNERS = ("top left", "top right", "bottom left", "bottom right")
POSITIONS = ("left", "right", "top", "bottom", "center", *CORNERS)
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
MAX_COUNT = 4

MARGIN = 0.03  # smallest distance from a bounding box to the frame, as a fraction of the side
GAP = 0.05  # smallest gap between two bounding boxes
THIRD_MARGIN = 0.03  # a positioned centre stays this far inside its third

# Scene mix. Single objects and pairs carry the shape/colour/size/position bindings that ShapesEval
# tests; counting teaches the number words; three-object lists keep composition from collapsing into
# "one or two things". Optional phrases are frequent enough to learn, rare enough to stay optional.
KINDS = ("single", "pair", "count", "triple")
KIND_WEIGHTS = (0.35, 0.35, 0.2, 0.1)
P_POSITION = 0.5  # a single object gets a position phrase
P_RELATION = 0.6  # a pair is related rather than joined by "and"
P_GRADIENT = 0.5
P_MENTION_SIZE = 0.35
P_MENTION_BACKGROUND = 0.35
P_BACKGROUND_FIRST = 0.25  # "a gray background with ..." instead of "... on a gray background"
P_SAY_ONE = 0.1  # "one red circle" instead of "a red circle"


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r}; expected one of {list(allowed)}")


@dataclass(frozen=True)
class Background:
    """One colour (solid) or two (a linear gradient from the first to the second)."""

    colors: tuple[str, ...]
    direction: str = "solid"  # "solid", "vertical" (first colour on top) or "horizontal" (first on the left)


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; its bounding box is a square of side ``extent`` centred on (x, y)."""

    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the width from the left
    y: float  # centre, fraction of the height from the top
    extent: float


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: ``count`` identical objects, e.g. "two large red circles"."""

    shape: str
    color: str
    count: int = 1
    size: str | None = None  # None: the phrase does not say

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.color, tuple(COLORS))
        if self.size is not None:
            _check("size", self.size, SIZES)
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count={self.count}; expected 1 to {MAX_COUNT}")


@dataclass(frozen=True)
class Description:
    """What a caption says, plus two style choices that change its wording but not its meaning.

    ``relation`` relates phrases[0] to phrases[1]; ``position`` places a single one-object phrase.
    """

    phrases: tuple[Phrase, ...]
    relation: str | None = None
    position: str | None = None
    background: tuple[str, ...] | None = None  # background colour names; None: not mentioned
    background_first: bool = False
    say_one: bool = False

    def __post_init__(self) -> None:
        if not 1 <= len(self.phrases) <= 3:
            raise ValueError(f"{len(self.phrases)} phrases; a caption names one to three")
        if self.relation is not None:
            _check("relation", self.relation, RELATIONS)
            if len(self.phrases) != 2 or any(p.count != 1 for p in self.phrases):
                raise ValueError(f"relation {self.relation!r} needs exactly two one-object phrases")
        if self.position is not None:
            _check("position", self.position, POSITIONS)
            if len(self.phrases) != 1 or self.phrases[0].count != 1:
                raise ValueError(f"position {self.position!r} needs exactly one one-object phrase")
        for c in self.background or ():
            _check("background colour", c, tuple(BACKGROUNDS))

    @property
    def kind(self) -> str:
        """The scene kind: single, count (one phrase of 2-4 objects), pair or triple."""
        if len(self.phrases) == 1:
            return "single" if self.phrases[0].count == 1 else "count"
        return "pair" if len(self.phrases) == 2 else "triple"


@dataclass(frozen=True)
class Scene:
    """A drawable scene and the full description it was built from (every size and colour stated)."""

    objects: tuple[SceneObject, ...]
    background: Background
    description: Description


# ---- truth of position and relation phrases -------------------------------------------------------


def position_holds(position: str, x: float, y: float) -> bool:
    """Whether a centre (x, y) in [0, 1] lies in the named third(s) of the image."""
    bands = {"left": (x < 1 / 3), "right": (x > 2 / 3), "top": (y < 1 / 3), "bottom": (y > 2 / 3)}
    if position == "center":
        return 1 / 3 < x < 2 / 3 and 1 / 3 < y < 2 / 3
    if position not in POSITIONS:
        raise ValueError(f"position={position!r}; expected one of {list(POSITIONS)}")
    return all(bands[word] for word in position.split())


def _relation_axis(relation: str) -> tuple[int, bool]:
    """(axis, first_is_lower): "A above B" is axis 1 (y) with A at the lower coordinate."""
    table = {
        "to the left of": (0, True),
        "to the right of": (0, False),
        "above": (1, True),
        "below": (1, False),
    }
    if relation not in table:
        raise ValueError(f"relation={relation!r}; expected one of {list(RELATIONS)}")
    return table[relation]


def relation_holds(a: SceneObject, b: SceneObject, relation: str, gap: float = GAP) -> bool:
    """Whether "a <relation> b" holds with a gap of at least ``gap`` between the bounding boxes."""
    axis, a_first = _relation_axis(relation)
    lo, hi = (a, b) if a_first else (b, a)
    lo_c, hi_c = (lo.x, hi.x) if axis == 0 else (lo.y, hi.y)
    return lo_c + lo.extent / 2 + gap <= hi_c - hi.extent / 2


# ---- sampling --------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _distinct_phrases(n: int, rng: np.random.Generator) -> tuple[Phrase, ...]:
    """n phrases with pairwise different (shape, colour), so every object is nameable."""
    combos = [(s, c) for s in SHAPES for c in COLORS]
    picks = rng.choice(len(combos), size=n, replace=False)
    return tuple(Phrase(*combos[int(i)], 1, _pick(rng, SIZES)) for i in picks)


def _sample_background(rng: np.random.Generator) -> tuple[str, ...]:
    n_colors = 2 if rng.random() < P_GRADIENT else 1
    return tuple(str(c) for c in rng.choice(list(BACKGROUNDS), size=n_colors, replace=False))


def sample_description(rng: np.random.Generator) -> Description:
    """Draw the full description of a training scene: kind, objects, sizes, position/relation, background."""
    kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
    background = _sample_background(rng)
    relation = position = None
    if kind == "single":
        phrases = _distinct_phrases(1, rng)
        position = _pick(rng, POSITIONS) if rng.random() < P_POSITION else None
    elif kind == "pair":
        phrases = _distinct_phrases(2, rng)
        relation = _pick(rng, RELATIONS) if rng.random() < P_RELATION else None
    elif kind == "count":
        count = int(rng.integers(2, MAX_COUNT + 1))
        phrases = (replace(_distinct_phrases(1, rng)[0], count=count),)
    else:
        phrases = _distinct_phrases(3, rng)
    return Description(phrases, relation, position, background)


def _extent(size: str, n_objects: int, rng: np.random.Generator) -> float:
    lo, hi = SMALL_EXTENT if size == "small" else LARGE_EXTENT
    if size == "large":
        # Fewer large objects fit: two related large shapes need 2*hi + GAP + 2*MARGIN <= 1.
        hi = min(hi, {1: 0.45, 2: 0.40}.get(n_objects, 0.34))
    return float(rng.uniform(lo, hi))


def _centre_range(extent: float) -> tuple[float, float]:
    return extent / 2 + MARGIN, 1 - extent / 2 - MARGIN


def _positioned_centre(position: str, extent: float, rng: np.random.Generator) -> tuple[float, float]:
    """A centre inside the named thirds (the middle third on an axis the phrase does not name)."""
    words = position.split()
    lo, hi = _centre_range(extent)
    low, mid, high = (
        (lo, 1 / 3 - THIRD_MARGIN),
        (1 / 3 + THIRD_MARGIN, 2 / 3 - THIRD_MARGIN),
        (2 / 3 + THIRD_MARGIN, hi),
    )
    x_band = low if "left" in words else high if "right" in words else mid
    y_band = low if "top" in words else high if "bottom" in words else mid
    return float(rng.uniform(*x_band)), float(rng.uniform(*y_band))


def _related_centres(
    extents: list[float], relation: str, rng: np.random.Generator
) -> list[tuple[float, float]] | None:
    """Centres for "A <relation> B" with a clear gap on the relation's axis; None if the sizes do not fit."""
    axis, a_first = _relation_axis(relation)
    e_lo, e_hi = (extents[0], extents[1]) if a_first else (extents[1], extents[0])
    lo_min, _ = _centre_range(e_lo)
    _, hi_max = _centre_range(e_hi)
    lo_max = hi_max - (e_lo + e_hi) / 2 - GAP
    if lo_max < lo_min:
        return None
    p_lo = float(rng.uniform(lo_min, lo_max))
    p_hi = float(rng.uniform(p_lo + (e_lo + e_hi) / 2 + GAP, hi_max))
    # The other axis stays roughly aligned so the pair reads as side by side (or stacked).
    s_lo = float(rng.uniform(*_centre_range(e_lo)))
    s_hi = float(np.clip(s_lo + rng.uniform(-0.15, 0.15), *_centre_range(e_hi)))
    lo_xy, hi_xy = ((p_lo, s_lo), (p_hi, s_hi)) if axis == 0 else ((s_lo, p_lo), (s_hi, p_hi))
    return [lo_xy, hi_xy] if a_first else [hi_xy, lo_xy]


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Axis-aligned bounding boxes (x, y, extent) separated by at least GAP on some axis."""
    reach = (a[2] + b[2]) / 2 + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _scattered_centres(
    extents: list[float], rng: np.random.Generator, tries: int = 100
) -> list[tuple[float, float]] | None:
    """Rejection sampling of non-overlapping centres; None if some object finds no room."""
    placed: list[tuple[float, float, float]] = []
    for e in extents:
        for _ in range(tries):
            x, y = (float(v) for v in rng.uniform(*_centre_range(e), size=2))
            if all(_apart((x, y, e), p) for p in placed):
                placed.append((x, y, e))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def place(description: Description, rng: np.random.Generator, max_tries: int = 100) -> Scene:
    """Build a scene that makes ``description`` true, choosing whatever it leaves open.

    Sizes the description omits are drawn at random (per phrase), as is the background; positions,
    relations and non-overlap are satisfied by construction or by rejection sampling.
    """
    phrases = tuple(p if p.size else replace(p, size=_pick(rng, SIZES)) for p in description.phrases)
    colors = description.background or _sample_background(rng)
    direction = "solid" if len(colors) == 1 else _pick(rng, ("vertical", "horizontal"))
    full = replace(description, phrases=phrases, background=colors, background_first=False, say_one=False)
    items = [(p.shape, p.color, p.size) for p in phrases for _ in range(p.count)]
    for _ in range(max_tries):
        extents = [_extent(size, len(items), rng) for _, _, size in items]
        if full.position is not None:
            centres = [_positioned_centre(full.position, extents[0], rng)]
        elif full.relation is not None:
            centres = _related_centres(extents, full.relation, rng)
        else:
            centres = _scattered_centres(extents, rng)
        if centres is not None:
            break
    else:
        from dcar.training.captions import describe  # captions builds on this module

        raise RuntimeError(f"no placement found for {describe(full)!r} in {max_tries} tries")
    objects = tuple(
        SceneObject(shape, color, size, x, y, e)
        for (shape, color, size), (x, y), e in zip(items, centres, extents, strict=True)
    )
    return Scene(objects, Background(colors, direction), full)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a training scene (deterministic given the generator's state)."""
    return place(sample_description(rng), rng)


# ---- serialisation ---------------------------------------------------------------------------------


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """A JSON-ready dict of the scene (inverse: :func:`scene_from_dict`)."""
    d = scene.description
    return {
        "objects": [vars(o).copy() for o in scene.objects],
        "background": {"colors": list(scene.background.colors), "direction": scene.background.direction},
        "description": {
            "phrases": [vars(p).copy() for p in d.phrases],
            "relation": d.relation,
            "position": d.position,
            "background": None if d.background is None else list(d.background),
        },
    }


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """Rebuild a scene written by :func:`scene_to_dict`."""
    d = data["description"]
    description = Description(
        tuple(Phrase(**p) for p in d["phrases"]),
        d["relation"],
        d["position"],
        None if d["background"] is None else tuple(d["background"]),
    )
    bg = data["background"]
    return Scene(
        tuple(SceneObject(**o) for o in data["objects"]),
        Background(tuple(bg["colors"]), bg["direction"]),
        description,
    )
