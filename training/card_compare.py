"""The model card's "old vs new" section: this model's results beside those of the model it replaced.

``dcar train export`` over an evaluated weights directory keeps the replaced model's ``eval.json``,
``samples.png``, ``training.json`` and card in ``previous/``; the card compares against them. Rows appear
only where both results were measured the same way (size, steps, seeds, prompts), so a difference is the
model's and not the measurement's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcar.training.failure_modes import FAULTS, failure_counts
from dcar.training.shapes_eval import CATEGORIES

PREVIOUS = "previous"  # export.py imports it from here: the card module does not import the trainers


def _same_protocol(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return all(a.get(k) == b.get(k) for k in keys)


def _delta(old: float, new: float, digits: int = 3) -> str:
    return f"{new - old:+.{digits}f}"


def _shapes_rows(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = old.get("shapes_eval"), new.get("shapes_eval")
    if not (a and b and _same_protocol(old, new, ("size", "steps", "seeds", "prompts", "guidance_scale"))):
        return []
    lines = ["| ShapesEval | previous | this model | change |", "| --- | ---: | ---: | ---: |"]
    for c in CATEGORIES:
        if c in a["categories"] and c in b["categories"]:
            x, y = a["categories"][c], b["categories"][c]
            lines.append(f"| {c.replace('_', ' ')} | {x:.3f} | {y:.3f} | {_delta(x, y)} |")
    lines.append(
        f"| **overall** | **{a['overall']:.3f}** | **{b['overall']:.3f}** | "
        f"**{_delta(a['overall'], b['overall'])}** |"
    )
    da, db = old.get("shapes_eval_discrete"), new.get("shapes_eval_discrete")
    if da and db:
        x, y = da["overall"], db["overall"]
        lines.append(f"| overall, codewords only | {x:.3f} | {y:.3f} | {_delta(x, y)} |")
    if a.get("prompts") and b.get("prompts"):  # counts of images, so the same protocol is needed (checked)
        fa, fb = failure_counts(a), failure_counts(b)
        lines.append(
            f"| failed images | {sum(fa['failed'].values())} | {sum(fb['failed'].values())} | "
            f"{sum(fb['failed'].values()) - sum(fa['failed'].values()):+d} |"
        )
        for fault in FAULTS:
            x, y = sum(fa["faults"][fault].values()), sum(fb["faults"][fault].values())
            if x or y:
                lines.append(f"| failed images, fault: {fault} | {x} | {y} | {y - x:+d} |")
    return lines


def _ceiling_rows(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = old.get("tokenizer_ceiling"), new.get("tokenizer_ceiling")
    if not (a and b and _same_protocol(a, b, ("size", "seeds", "num_images"))):
        return []
    cats = [c for c in CATEGORIES if c in b["paths"]["truth"]["categories"]]
    lines = [
        "| ceiling path | model | " + " | ".join(c.replace("_", " ") for c in cats) + " | **overall** |",
        "| --- | --- |" + " ---: |" * (len(cats) + 1),
    ]
    for path in b["paths"]:
        if path == "truth" or path not in a["paths"]:
            continue
        for label, r in (("previous", a["paths"][path]), ("this model", b["paths"][path])):
            cells = " | ".join(f"{r['categories'][c]:.3f}" for c in cats)
            lines.append(f"| {path} | {label} | {cells} | **{r['overall']:.3f}** |")
    return lines


def _recon_rows(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = old.get("reconstruction"), new.get("reconstruction")
    if not (a and b and old.get("eval_images") == new.get("eval_images")):
        return []
    lines = [
        "| reconstruction | PSNR previous (dB) | PSNR this model (dB) | SSIM previous | SSIM this model |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for size in b:
        for path in ("continuous", "discrete", "hybrid"):
            if size in a and path in a[size] and path in b[size]:
                x, y = a[size][path], b[size][path]
                lines.append(
                    f"| {path}, {size} px | {x['psnr']:.2f} | {y['psnr']:.2f} | {x['ssim']:.4f} | {y['ssim']:.4f} |"
                )
    return lines


def comparison_lines(weights: Path, results: dict[str, Any], samples: str) -> list[str]:
    """Markdown lines of the section, or none when ``weights/previous/eval.json`` is absent."""
    prev = weights / PREVIOUS
    if not (prev / "eval.json").is_file():
        return []
    old = json.loads((prev / "eval.json").read_text())
    lines = [
        "## This model vs the one it replaced",
        "",
        f"The replaced model's card, results and samples are in `{PREVIOUS}/` ([card]({PREVIOUS}/README.md)).",
        "Rows appear only where both were measured the same way.",
        "",
    ]
    for table in (_shapes_rows(old, results), _ceiling_rows(old, results), _recon_rows(old, results)):
        if table:
            lines += [*table, ""]
    if (prev / samples).is_file():
        lines += [
            "Samples of the same prompts and seeds, previous model then this one:",
            "",
            f"![previous samples]({PREVIOUS}/{samples})",
            "",
            f"![samples of this model]({samples})",
            "",
        ]
    return lines
