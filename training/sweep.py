"""Sampling-default sweeps: ShapesEval of one model over a grid of knob values.

A model's sampling defaults (guidance, Gumbel temperature, ...) are chosen on held-out tuning prompts, so
the ShapesEval score it reports is not tuned on its own prompts. ``dcar eval W --sweep KNOB=V1,V2 ...``
scores every combination on those prompts and prints one row each, with the failure counts beside the
score: a setting that trades shape faults for colour faults shows it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from dcar.model.knobs import KNOB_NAMES, parse_knob
from dcar.training.failure_modes import failure_counts
from dcar.training.shapes_eval import PromptSpec


def parse_sweep(specs: Sequence[str]) -> list[dict[str, Any]]:
    """``["guidance_scale=1,3", "randomize_temperature=0,0.5"]`` -> the grid, one dict per combination.

    Dashes are allowed in knob names (``guidance-scale``). Every value is parsed and checked as the CLI's
    knob flags are (``parse_knob``) before anything runs; a knob named twice is an error.
    """
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--sweep {spec!r}: expected KNOB=V1,V2,... (e.g. guidance_scale=1,1.5,3)")
        if name not in KNOB_NAMES:
            raise ValueError(f"--sweep {spec!r}: unknown knob {name!r}; one of {', '.join(KNOB_NAMES)}")
        if name in axes:
            raise ValueError(f"--sweep: {name} is given twice; list all its values in one --sweep")
        axes[name] = [parse_knob(name, v.strip()) for v in values.split(",")]  # KnobError names it
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def run_sweep(
    pipe: Any,
    grid: Sequence[dict[str, Any]],
    prompts: Sequence[PromptSpec],
    size: int = 256,
    steps: int = 12,
    seeds: Sequence[int] = (0, 1, 2, 3),
) -> list[dict[str, Any]]:
    """ShapesEval of ``pipe`` once per grid point: ``[{"knobs": {...}, "shapes_eval": result}, ...]``."""
    from dcar.training.evaluate import shapes_eval  # torch and the pipeline: only when something runs

    rows = []
    for knobs in grid:
        overrides = dict(knobs)
        row_steps = overrides.pop("steps", steps)
        use_residuals = overrides.pop("use_residuals", True)
        result = shapes_eval(
            pipe, size, row_steps, seeds, use_residuals=use_residuals, prompts=prompts, **overrides
        )
        rows.append({"knobs": dict(knobs), "shapes_eval": result})
    return rows


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per grid point; the best overall score in bold."""
    if not rows:
        return "(empty sweep)"
    names = list(rows[0]["knobs"])
    cats = list(rows[0]["shapes_eval"]["categories"])
    best = max(r["shapes_eval"]["overall"] for r in rows)
    lines = [
        "| "
        + " | ".join([*names, *(c.replace("_", " ") for c in cats)])
        + " | overall | failed | shape faults |",
        "| " + " | ".join(["---"] * len(names)) + " |" + " ---: |" * (len(cats) + 3),
    ]
    for r in rows:
        s = r["shapes_eval"]
        counts = failure_counts(s)
        overall = f"{s['overall']:.3f}"
        cells = [
            *(
                str(r["knobs"][n]).lower() if isinstance(r["knobs"][n], bool) else str(r["knobs"][n])
                for n in names
            ),
            *(f"{s['categories'][c]:.3f}" for c in cats),
            f"**{overall}**" if s["overall"] == best else overall,
            f"{sum(counts['failed'].values())}/{s['num_images']}",
            str(sum(counts["faults"]["shape"].values())),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(str(x) for x in rows[0]["shapes_eval"]["seeds"])
    lines.append(
        f"\n{rows[0]['shapes_eval']['num_images']} images per row at {rows[0]['shapes_eval']['size']} px, seeds {seeds}."
    )
    return "\n".join(lines)
