"""Caption text for scenes: the templates (describe), their inverse (parse_caption) and the varied
captions drawn for training (caption). training/VOCABULARY.md documents every template."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from dcar.training.scenes import (
    CORNERS,
    NUMBER_WORDS,
    P_BACKGROUND_FIRST,
    P_MENTION_BACKGROUND,
    P_MENTION_SIZE,
    P_SAY_ONE,
    RELATIONS,
    Description,
    Phrase,
    Scene,
)

_POSITION_TEXT = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    **{p: f"in the {p} corner" for p in CORNERS},
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(p: Phrase, say_one: bool) -> str:
    words = [w for w in (p.size, p.color) if w]
    noun = p.shape if p.count == 1 else p.shape + "s"
    det = ("one" if say_one else _article(words[0])) if p.count == 1 else NUMBER_WORDS[p.count]
    return " ".join([det, *words, noun])


def _background_text(colors: tuple[str, ...]) -> str:
    if len(colors) == 1:
        return f"a {colors[0]} background"
    return f"a gradient from {colors[0]} to {colors[1]}"


def describe(d: Description) -> str:
    """The caption text of a description, e.g. "a yellow triangle above a purple square on a gray background"."""
    nps = [_noun_phrase(p, d.say_one) for p in d.phrases]
    if d.relation is not None:
        main = f"{nps[0]} {d.relation} {nps[1]}"
    elif len(nps) == 3:
        main = f"{nps[0]}, {nps[1]} and {nps[2]}"
    else:
        main = " and ".join(nps)
    if d.position is not None:
        main = f"{main} {_POSITION_TEXT[d.position]}"
    if d.background is None:
        return main
    bg = _background_text(d.background)
    return f"{bg} with {main}" if d.background_first else f"{main} on {bg}"


_BG_PATTERN = r"a (\w+) background|a gradient from (\w+) to (\w+)"


def _parse_background(solid: str | None, start: str | None, end: str | None) -> tuple[str, ...]:
    return (solid,) if solid else (start, end)  # type: ignore[return-value]


def _parse_noun_phrase(text: str) -> tuple[Phrase, bool]:
    words = text.split()
    if len(words) not in (3, 4):
        raise ValueError(f"cannot read {text!r} as '<a|one|two..four> [small|large] <colour> <shape>'")
    det, *adjectives, noun = words
    count = 1 if det in ("a", "an") else (NUMBER_WORDS.index(det) if det in NUMBER_WORDS[1:] else 0)
    if count == 0:
        raise ValueError(f"{text!r} starts with {det!r}; expected a, an or one to four")
    if (count > 1) != noun.endswith("s"):
        raise ValueError(f"{noun!r} in {text!r}: the noun is plural exactly after two to four")
    if det in ("a", "an") and det != _article(adjectives[0]):
        raise ValueError(f"{text!r}: expected {_article(adjectives[0])!r} before {adjectives[0]!r}")
    size = adjectives[0] if len(adjectives) == 2 else None
    shape = noun if count == 1 else noun.removesuffix("s")
    return Phrase(shape, adjectives[-1], count, size), det == "one"


def parse_caption(text: str) -> Description:
    """Read a caption written by :func:`describe` back into its description (inverse of describe).

    Raises ValueError, naming the offending word, for text outside the vocabulary and templates.
    """
    background, first, main = None, False, text.strip()
    if m := re.fullmatch(rf"(?:{_BG_PATTERN}) with (.+)", main):
        background, first, main = _parse_background(*m.groups()[:3]), True, m.group(4)
    elif m := re.fullmatch(rf"(.+) on (?:{_BG_PATTERN})", main):
        background, main = _parse_background(*m.groups()[1:]), m.group(1)
    position = next((p for p, t in _POSITION_TEXT.items() if main.endswith(" " + t)), None)
    if position is not None:
        main = main.removesuffix(" " + _POSITION_TEXT[position])
    relation = next((r for r in RELATIONS if f" {r} " in main), None)
    if relation is not None:
        parts = main.split(f" {relation} ")
    elif ", " in main:
        head, _, tail = main.partition(", ")
        parts = [head, *tail.split(" and ")]
    else:
        parts = main.split(" and ")
    parsed = [_parse_noun_phrase(p) for p in parts]
    d = Description(
        tuple(p for p, _ in parsed), relation, position, background, first, any(o for _, o in parsed)
    )
    if describe(d) != text.strip():
        raise ValueError(f"{text!r} does not follow the caption templates (closest: {describe(d)!r})")
    return d


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for the scene: always its objects, position and relation; sizes and background sometimes."""
    d = scene.description
    keep_size = rng.random() < P_MENTION_SIZE
    keep_bg = rng.random() < P_MENTION_BACKGROUND
    bg_first = rng.random() < P_BACKGROUND_FIRST
    say_one = rng.random() < P_SAY_ONE
    return describe(
        replace(
            d,
            phrases=tuple(p if keep_size else replace(p, size=None) for p in d.phrases),
            background=d.background if keep_bg else None,
            background_first=keep_bg and bg_first,
            say_one=d.kind == "single" and say_one,
        )
    )
