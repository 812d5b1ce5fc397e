"""Why ShapesEval images fail: each failed image's faults against everything its prompt says.

A category's verdict is one bit (GenEval's rule); choosing what to train next needs the reason. A blue
square drawn as a blue circle is a shape fault (the decoder or the generator lost the corners); a red
circle drawn blue beside a blue square is a binding fault (the text encoder or the cross-attention did not
tie the colour to its noun); a stray blob in a corner is neither. ``faults`` names them from the
detections, so a stored ``eval.json`` (detections kept as text) can be explained without generating again.

Faults are judged against the whole description (shape, colour, size, count, relation), not only against
what the category's rule checks, so a two-object image that passed its rule is not explained here: only
failed images are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dcar.training.scenes import SHAPES, Phrase
from dcar.training.shapes_eval import CATEGORIES, EVAL_PROMPTS, Detection, PromptSpec, relation_holds

FAULTS = {
    "missing": "an object the prompt names has neither its shape nor its colour anywhere",
    "shape": "an object is there in its colour but drawn as another shape (a square read as a circle)",
    "own colour lost": "an object's shape is there, in a colour no object of the prompt has",
    "colour bound wrong": "an object's shape is there in another named object's colour (attributes mixed)",
    "count": "the right shape and colour, but too few or too many of them",
    "size": "the right shape and colour, but not the size the prompt asks for",
    "relation": "both objects are right but not placed as the prompt says",
    "stray": "a detection in a colour the prompt does not name (a blob, a fringe)",
}


def _exact(dets: Sequence[Detection], phrase: Phrase) -> list[Detection]:
    return [d for d in dets if d.shape == phrase.shape and d.color == phrase.color]


def drawn_as(dets: Sequence[Detection], phrase: Phrase) -> str | None:
    """The shape an object was drawn as instead of its own (its colour's largest other-shape detection),
    or None when enough of it is there as asked or nothing of its colour is."""
    if len(_exact(dets, phrase)) >= phrase.count:
        return None
    return next((d.shape for d in dets if d.color == phrase.color and d.shape != phrase.shape), None)


def faults(dets: Sequence[Detection], spec: PromptSpec) -> list[str]:
    """The faults (keys of ``FAULTS``, each at most once, in that order) of detections for a prompt."""
    phrases = spec.description.phrases
    found: set[str] = set()
    named_colors = {p.color for p in phrases}
    explained: set[int] = set()
    for p in phrases:
        exact = _exact(dets, p)
        if len(exact) < p.count:
            wrong_colour = [d for d in dets if d.shape == p.shape and d.color != p.color]
            if drawn_as(dets, p) is not None:
                found.add("shape")
            elif any(d.color in named_colors for d in wrong_colour):
                found.add("colour bound wrong")
            elif wrong_colour:
                found.add("own colour lost")
                explained.update(id(d) for d in wrong_colour)  # the object itself, not a stray
            else:  # nothing else explains the shortfall
                found.add("count" if exact else "missing")
        elif len(exact) > p.count:
            found.add("count")
        if p.size is not None and exact and not any(d.size == p.size for d in exact):
            found.add("size")
    relation = spec.description.relation
    if relation is not None:
        # Largest first; the second object is another detection when both phrases are alike.
        firsts = _exact(dets, phrases[0])
        seconds = [d for d in _exact(dets, phrases[1]) if not firsts or d is not firsts[0]]
        if firsts and seconds and not relation_holds(firsts[0], seconds[0], relation):
            found.add("relation")
    if any(d.color not in named_colors and id(d) not in explained for d in dets):
        found.add("stray")
    return [f for f in FAULTS if f in found]


def failure_counts(results: dict[str, Any]) -> dict[str, Any]:
    """Per category: images, failed images, and failed images showing each fault.

    ``results`` is a ``run_shapes_eval`` result (fresh or read back from eval.json). Prompts are looked up
    among the evaluation prompts by text, or parsed from their text and category when not among them
    (tuning prompts).
    """
    known = {(s.category, s.prompt): s for s in EVAL_PROMPTS}
    images = dict.fromkeys(CATEGORIES, 0)
    failed = dict.fromkeys(CATEGORIES, 0)
    table = {f: dict.fromkeys(CATEGORIES, 0) for f in FAULTS}
    asked = dict.fromkeys(SHAPES, 0)
    drawn = {a: dict.fromkeys(SHAPES, 0) for a in SHAPES}
    for r in results["prompts"]:
        cat = r["category"]
        spec = known.get((cat, r["prompt"])) or PromptSpec.from_text(cat, r["prompt"])
        for ok, texts in zip(r["passed"], r["detections"], strict=True):
            dets = [Detection.parse(t) for t in texts]
            images[cat] += 1
            for p in spec.description.phrases:  # every image: a category's rule may ignore a shape fault
                asked[p.shape] += 1
                if (instead := drawn_as(dets, p)) is not None:
                    drawn[p.shape][instead] += 1
            if ok:
                continue
            failed[cat] += 1
            for f in faults(dets, spec):
                table[f][cat] += 1
    cats = [c for c in CATEGORIES if images[c]]
    return {
        "categories": cats,
        "images": {c: images[c] for c in cats},
        "failed": {c: failed[c] for c in cats},
        "faults": {f: {c: table[f][c] for c in cats} for f in FAULTS},
        "objects_asked": asked,
        "drawn_as": drawn,
    }


def format_failures(results: dict[str, Any]) -> str:
    """A Markdown table: failed images per category and fault, with a total column."""
    counts = failure_counts(results)
    cats = counts["categories"]
    head = "| | " + " | ".join(c.replace("_", " ") for c in cats) + " | **all** |"
    lines = [head, "| --- |" + " ---: |" * (len(cats) + 1)]
    failed = counts["failed"]
    lines.append(
        "| **failed images** | "
        + " | ".join(f"{failed[c]}/{counts['images'][c]}" for c in cats)
        + f" | **{sum(failed.values())}/{sum(counts['images'].values())}** |"
    )
    for f, per in counts["faults"].items():
        if any(per.values()):
            lines.append(
                f"| {f} | " + " | ".join(str(per[c]) for c in cats) + f" | **{sum(per.values())}** |"
            )
    lines.append("")
    lines.append("An image can show several faults. What each means:")
    lines.append("")
    lines += [f"- {f}: {why}." for f, why in FAULTS.items() if any(counts["faults"][f].values())]
    lines += [
        "",
        "Objects drawn in their colour as another shape, over all images (a phrase counts once):",
        "",
    ]
    lines += ["| asked | objects asked | " + " | ".join(f"drawn as {s}" for s in SHAPES) + " |"]
    lines += ["| --- | ---: |" + " ---: |" * len(SHAPES)]
    for a, n in counts["objects_asked"].items():
        if n:
            cells = " | ".join("-" if s == a else str(counts["drawn_as"][a][s]) for s in SHAPES)
            lines.append(f"| {a} | {n} | {cells} |")
    return "\n".join(lines)
