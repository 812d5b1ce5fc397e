"""ShapesEval: GenEval's six categories (Ghosh et al., NeurIPS 2023) on the procedural-scenes vocabulary.

GenEval scores a text-to-image model by running an object detector on its images and checking each
prompt's structured expectation. Our scenes need no learned detector: ``detect`` segments the image
by palette (each pixel to the nearest object colour, or to the background, which it fits as a linear
gradient from the image border), splits each colour into connected components and names each
component's shape from two scale-free features of its mask. ``EVAL_PROMPTS`` holds the fixed prompts,
written with the training caption templates so they are in-distribution, and ``run_shapes_eval``
batches them through a generator and reports per-category accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dcar.training.captions import parse_caption
from dcar.training.scenes import COLORS, Description, Phrase, Scene, place

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

WORK_SIZE = 128  # detection runs at this resolution at most: faster, and box-averaging calms noise
FAR_FROM_OBJECTS = 100.0  # RGB distance beyond which a pixel belongs to no object colour
MIN_AREA = 0.003  # components below this fraction of the image are noise (a small shape is ~0.01)
MAX_ASPECT = 2.5  # every shape has a square bounding box; long thin components are edge fringes
LARGE_FROM = 0.26  # bounding-box side / image side: small shapes reach 0.22, large start at 0.30
RELATION_MARGIN = 0.1  # "A left of B" needs B's centre at least this much further right
# (fill ratio = area / bbox area, top share = fraction of the area in the upper half of the bbox).
# Upright triangles put only a quarter of their area in the top half, which separates them from
# circles even when a lossy decoder rounds their corners.
SHAPE_PROTOTYPES = {"circle": (np.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.25)}

_PALETTE = np.array(list(COLORS.values()), np.float32)  # (8, 3)
_COLOR_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class Detection:
    """One detected shape. x, y: bounding-box centre in [0, 1]; area: fraction of the image."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    area: float

    def __str__(self) -> str:
        return f"{self.size} {self.color} {self.shape} at ({self.x:.2f}, {self.y:.2f})"

    @classmethod
    def parse(cls, text: str) -> Detection:
        """The inverse of ``str`` (eval.json keeps detections as text); the area is not kept: 0."""
        match = _DETECTION_TEXT.fullmatch(text)
        if match is None:
            raise ValueError(f"not a detection: {text!r}; expected e.g. 'large red circle at (0.50, 0.25)'")
        size, color, shape, x, y = match.groups()
        return cls(shape=shape, color=color, size=size, x=float(x), y=float(y), area=0.0)


_DETECTION_TEXT = re.compile(r"(small|large) (\w+) (circle|square|triangle) at \(([\d.]+), ([\d.]+)\)")


# ---- detector ------------------------------------------------------------------------------------


def _background_model(px: np.ndarray) -> np.ndarray:
    """Fit colour = a + b*x + c*y per channel to the border pixels; (H, W, 3) background estimate.

    A second fit drops the 30% worst-fitting border pixels, so a shape touching the border does not
    drag the estimate.
    """
    h, w, _ = px.shape
    ys, xs = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    design = np.stack([np.ones(border.sum()), xs[border] / w, ys[border] / h], axis=1)
    target = px[border].astype(np.float64)
    keep = np.ones(len(target), bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(design[keep], target[keep], rcond=None)  # (3 terms, 3 channels)
        residual = np.linalg.norm(design @ coef - target, axis=1)
        keep = residual <= np.quantile(residual, 0.7)
    full = np.stack([np.ones(h * w), xs.ravel() / w, ys.ravel() / h], axis=1)
    return (full @ coef).reshape(h, w, 3).astype(np.float32)


def _segment(px: np.ndarray) -> np.ndarray:
    """(H, W) labels: index into COLORS, or -1 for background."""
    d_obj = np.linalg.norm(px[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, 8)
    d_bg = np.linalg.norm(px - _background_model(px), axis=-1)  # (H, W)
    nearest = d_obj.argmin(-1)
    d_near = d_obj.min(-1)
    return np.where((d_near < d_bg) & (d_near < FAR_FROM_OBJECTS), nearest, -1)


def _shift_all(
    mask: np.ndarray, combine: Callable[[np.ndarray, np.ndarray], np.ndarray], pad: bool
) -> np.ndarray:
    p = np.pad(mask, 1, constant_values=pad)
    out = mask.copy()
    h, w = mask.shape
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = combine(out, p[dy : dy + h, dx : dx + w])
    return out


def _open(mask: np.ndarray) -> np.ndarray:
    """3x3 morphological opening: removes one-pixel anti-aliasing fringes and speckles."""
    return _shift_all(_shift_all(mask, np.logical_and, True), np.logical_or, False)


def _components(mask: np.ndarray) -> list[dict[str, float]]:
    """4-connected components of a mask, found by union-find over horizontal runs.

    Returns per component: area, bbox (x0, x1, y0, y1; exclusive ends) and the area in the bbox's top half.
    """
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major order pairs each start with its end
    n = len(rows)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(mask.shape[0] - 1):
        i, i_end, j, j_end = row_start[r], row_start[r + 1], row_start[r + 1], row_start[r + 2]
        while i < i_end and j < j_end:  # two runs in adjacent rows touch if their spans overlap
            if starts[i] < ends[j] and starts[j] < ends[i]:
                parent[find(i)] = find(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    _, comp = np.unique([find(i) for i in range(n)], return_inverse=True)
    k = comp.max() + 1
    lengths = (ends - starts).astype(np.float64)
    area = np.bincount(comp, lengths, k)
    x0, y0 = np.full(k, np.inf), np.full(k, np.inf)
    x1, y1 = np.full(k, -np.inf), np.full(k, -np.inf)
    np.minimum.at(x0, comp, starts)
    np.maximum.at(x1, comp, ends)
    np.minimum.at(y0, comp, rows)
    np.maximum.at(y1, comp, rows + 1)
    mid = (y0 + y1) / 2
    top = np.bincount(comp, lengths * np.clip(mid[comp] - rows, 0.0, 1.0), k)  # row r spans [r, r+1)
    return [
        {"area": area[c], "x0": x0[c], "x1": x1[c], "y0": y0[c], "y1": y1[c], "top": top[c]} for c in range(k)
    ]


def _classify_shape(fill: float, top_share: float) -> str:
    return min(
        SHAPE_PROTOTYPES,
        key=lambda s: np.hypot(fill - SHAPE_PROTOTYPES[s][0], top_share - SHAPE_PROTOTYPES[s][1]),
    )


def detect(image: Image.Image) -> list[Detection]:
    """Find the coloured shapes in an image, largest first. Deterministic; any size, any mode."""
    img = image.convert("RGB")
    scale = WORK_SIZE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BOX)
    px = np.asarray(img, np.float32)  # (H, W, 3)
    h, w, _ = px.shape
    labels = _segment(px)
    found = []
    for ci, color in enumerate(_COLOR_NAMES):
        for c in _components(_open(labels == ci)):
            bw, bh = c["x1"] - c["x0"], c["y1"] - c["y0"]
            if c["area"] < MIN_AREA * h * w or max(bw, bh) > MAX_ASPECT * min(bw, bh):
                continue
            found.append(
                Detection(
                    shape=_classify_shape(c["area"] / (bw * bh), c["top"] / c["area"]),
                    color=color,
                    size="large" if max(bw / w, bh / h) >= LARGE_FROM else "small",
                    x=float((c["x0"] + c["x1"]) / 2 / w),
                    y=float((c["y0"] + c["y1"]) / 2 / h),
                    area=float(c["area"] / (h * w)),
                )
            )
    return sorted(found, key=lambda d: -d.area)


# ---- prompts and verdicts ------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """An evaluation prompt, its GenEval category and its parsed description."""

    category: str
    prompt: str
    description: Description

    @classmethod
    def from_text(cls, category: str, prompt: str) -> PromptSpec:
        if category not in CATEGORIES:
            raise ValueError(f"category {category!r}; expected one of {list(CATEGORIES)}")
        return cls(category, prompt, parse_caption(prompt))


_EVAL_TEXT = {
    "single_object": (
        "a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
        "an orange triangle", "a white circle", "a black square", "a large blue triangle", "a small red square",
    ),
    "two_object": (
        "a red circle and a blue square", "a green triangle and a yellow circle",
        "a purple square and an orange triangle", "a white circle and a black triangle",
        "a blue triangle and a red square", "a yellow square and a green circle",
        "an orange circle and a purple triangle", "a black square and a white circle",
        "a red triangle and a green square", "a blue circle and an orange square",
    ),
    "counting": (
        "two red circles", "three blue squares", "four green triangles", "two yellow triangles",
        "three purple circles", "four orange squares", "two white squares", "three black triangles",
        "four blue circles", "two green squares",
    ),
    "colors": (
        "a yellow square", "a purple circle", "an orange square", "a green circle", "a red triangle",
        "a blue circle", "a white triangle", "a black circle", "a purple triangle", "an orange circle",
    ),
    "position": (
        "a red circle to the left of a blue square", "a yellow triangle above a purple square",
        "a green square to the right of an orange circle", "a blue triangle below a white circle",
        "a black circle to the left of a yellow triangle", "a purple square above a green circle",
        "an orange triangle to the right of a red square", "a white square below a blue circle",
        "a green triangle to the left of a black square", "a red square above an orange triangle",
    ),
    "color_attr": (
        "a blue circle and a red square", "a yellow triangle and a purple circle",
        "an orange square and a green triangle", "a black circle and a white square",
        "a red triangle and a yellow square", "a green circle and a blue triangle",
        "a white triangle and an orange circle", "a purple square and a black triangle",
        "a blue square and a yellow circle", "a red circle and a green triangle",
    ),
}  # fmt: skip
EVAL_PROMPTS: tuple[PromptSpec, ...] = tuple(
    PromptSpec.from_text(category, text) for category, texts in _EVAL_TEXT.items() for text in texts
)


def scene_for_prompt(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A ground-truth scene that satisfies the prompt (sizes and background drawn where it is silent)."""
    return place(spec.description, rng)


def _largest(dets: list[Detection], phrase: Phrase, exclude: Detection | None = None) -> Detection | None:
    """The largest detection of the phrase's shape, preferring one of its colour too."""
    same_shape = [d for d in dets if d.shape == phrase.shape and d is not exclude]
    same_color = [d for d in same_shape if d.color == phrase.color]
    return (same_color or same_shape or [None])[0]


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    delta = {
        "to the left of": b.x - a.x,
        "to the right of": a.x - b.x,
        "above": b.y - a.y,
        "below": a.y - b.y,
    }
    return delta[relation] >= RELATION_MARGIN


def verdict(dets: list[Detection], spec: PromptSpec) -> bool:
    """GenEval's rule for the spec's category, applied to detections (largest first)."""
    phrases = spec.description.phrases
    if spec.category == "single_object":  # stricter than GenEval: the one object and nothing else
        return len(dets) == 1 and dets[0].shape == phrases[0].shape
    if spec.category == "two_object":
        return all(any(d.shape == p.shape for d in dets) for p in phrases)
    if spec.category == "counting":
        return sum(d.shape == phrases[0].shape for d in dets) == phrases[0].count
    if spec.category in ("colors", "color_attr"):  # the most prominent object of each shape has its colour
        return all(
            (top := next((d for d in dets if d.shape == p.shape), None)) is not None and top.color == p.color
            for p in phrases
        )
    a = _largest(dets, phrases[0])
    b = _largest(dets, phrases[1], exclude=a)
    return a is not None and b is not None and relation_holds(a, b, spec.description.relation or "")


def score(image: Image.Image, spec: PromptSpec) -> bool:
    """Whether the image satisfies the prompt under its ShapesEval category."""
    return verdict(detect(image), spec)


# ---- benchmark -----------------------------------------------------------------------------------


def run_shapes_eval(
    generate_fn: Callable[[list[str], list[int]], list[Image.Image]],
    size: int = 256,
    seeds: Sequence[int] = (0, 1, 2, 3),
    prompts: Sequence[PromptSpec] = EVAL_PROMPTS,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Generate every prompt with every seed (``batch_size`` images per call) and score them.

    ``generate_fn(prompts, seeds)`` returns one ``size`` x ``size`` image per (prompt, seed) pair.
    Returns ``{"categories": {category: accuracy}, "overall": mean of the categories, "size",
    "seeds", "num_images", "prompts": [{"category", "prompt", "passed": [per seed], "accuracy",
    "detections": [[str per detection] per seed]}]}``.
    """
    jobs = [(i, seed) for i in range(len(prompts)) for seed in seeds]
    passed: list[list[bool]] = [[] for _ in prompts]
    found: list[list[list[str]]] = [[] for _ in prompts]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = generate_fn([prompts[i].prompt for i, _ in chunk], [seed for _, seed in chunk])
        if len(images) != len(chunk):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(chunk)} prompts")
        for (i, _), image in zip(chunk, images, strict=True):
            if image.size != (size, size):
                raise ValueError(f"generate_fn returned a {image.size} image; expected ({size}, {size})")
            dets = detect(image)
            passed[i].append(verdict(dets, prompts[i]))
            found[i].append([str(d) for d in dets])
    per_prompt = [
        {
            "category": p.category,
            "prompt": p.prompt,
            "passed": ok,
            "accuracy": float(np.mean(ok)),
            "detections": f,
        }
        for p, ok, f in zip(prompts, passed, found, strict=True)
    ]
    categories = {
        c: float(np.mean([ok for r in per_prompt if r["category"] == c for ok in r["passed"]]))
        for c in CATEGORIES
        if any(r["category"] == c for r in per_prompt)
    }
    return {
        "categories": categories,
        "overall": float(np.mean(list(categories.values()))),
        "size": size,
        "seeds": list(seeds),
        "num_images": len(jobs),
        "prompts": per_prompt,
    }


def format_results(results: dict[str, Any], per_prompt: bool = False) -> str:
    """A Markdown table of a :func:`run_shapes_eval` result, for the model card."""
    lines = ["| category | accuracy |", "| --- | ---: |"]
    lines += [f"| {c.replace('_', ' ')} | {acc:.3f} |" for c, acc in results["categories"].items()]
    lines.append(f"| **overall** | **{results['overall']:.3f}** |")
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines.append(f"\n{results['num_images']} images at {results['size']} px, seeds {seeds}.")
    if per_prompt:
        lines += ["", "| category | prompt | passed |", "| --- | --- | ---: |"]
        lines += [
            f"| {r['category'].replace('_', ' ')} | {r['prompt']} | {sum(r['passed'])}/{len(r['passed'])} |"
            for r in results["prompts"]
        ]
    return "\n".join(lines)
