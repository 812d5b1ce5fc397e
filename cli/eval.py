"""``dcar eval WEIGHTS``: ShapesEval, reconstruction PSNR/SSIM and hybrid vs discrete-only of a weights
directory; ``--write-card`` also writes its model card (README.md), sample grid and eval.json."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see cli/train.py

from dcar.cli.common import add_device_argument, resolve_device  # noqa: E402

CARD_PROMPTS = (
    "a red circle",
    "two blue squares",
    "a yellow triangle above a purple square",
    "a green circle in the top left corner",
    "three white triangles on a gray background",
    "a black square to the right of an orange circle",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="weights directory (dcar layout)")
    parser.add_argument("--size", type=int, default=256, help="ShapesEval image size")
    parser.add_argument("--steps", type=int, default=12, help="unmasking steps")
    parser.add_argument("--seeds", default="0,1,2,3", help="ShapesEval seeds per prompt")
    parser.add_argument("--guidance-scale", type=float, default=None, help="override the model's default")
    parser.add_argument(
        "--prompts",
        choices=("shapes-eval", "tuning"),
        default="shapes-eval",
        help="ShapesEval's prompts, or held-out ones of the same categories for tuning defaults",
    )
    parser.add_argument("--eval-split", default="runs/eval-split", help="evaluation split directory")
    parser.add_argument("--num-eval", type=int, default=100, help="evaluation-split scenes used")
    parser.add_argument("--recon-sizes", default="256,512")
    parser.add_argument(
        "--skip", default="", help="comma list of: shapes, discrete, recon, hybrid (default: skip nothing)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    add_device_argument(parser)
    parser.add_argument("--per-prompt", action="store_true", help="print every prompt's result")
    parser.add_argument("--json", default=None, help="write the results here as well")
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="write README.md, samples.png and eval.json into the weights directory",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from dcar.model.pipeline import Pipeline
    from dcar.training.evaluate import (
        eval_split,
        hybrid_vs_discrete,
        reconstruction,
        sample_grid,
        shapes_eval,
        tuning_prompts,
    )
    from dcar.training.model_card import RESULTS, SAMPLES, write_card
    from dcar.training.shapes_eval import format_results

    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    # float32 on every device: the reported numbers must not depend on where they were measured.
    pipe = Pipeline.from_pretrained(args.weights, device=resolve_device(args.device), dtype=torch.float32)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    overrides = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    if args.prompts == "tuning":
        overrides["prompts"] = tuning_prompts()
    results: dict = {
        "weights": str(args.weights),
        "size": args.size,
        "steps": args.steps,
        "seeds": list(seeds),
        "prompts": args.prompts,
        "guidance_scale": args.guidance_scale,
    }
    t0 = time.monotonic()
    if "shapes" not in skip:
        results["shapes_eval"] = shapes_eval(pipe, args.size, args.steps, seeds, **overrides)
        print(format_results(results["shapes_eval"], per_prompt=args.per_prompt))
        if "discrete" not in skip:
            results["shapes_eval_discrete"] = shapes_eval(
                pipe, args.size, args.steps, seeds, use_residuals=False, **overrides
            )
            print(f"without residuals: overall {results['shapes_eval_discrete']['overall']:.3f}")
    if not ({"recon", "hybrid"} <= skip):
        samples = eval_split(args.eval_split, args.num_eval)
        results["eval_images"] = len(samples)
        if "recon" not in skip:
            sizes = tuple(int(s) for s in args.recon_sizes.split(","))
            results["reconstruction"] = reconstruction(pipe, samples, sizes)
            print(json.dumps(results["reconstruction"], indent=1))
        if "hybrid" not in skip:
            results["hybrid_vs_discrete"] = hybrid_vs_discrete(pipe, samples, args.size)
            print(json.dumps(results["hybrid_vs_discrete"], indent=1))
    results["seconds"] = time.monotonic() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.write_card:
        from pathlib import Path

        weights = Path(args.weights)
        sample_grid(pipe, CARD_PROMPTS, seeds=(0, 1), size=args.size).save(weights / SAMPLES)
        (weights / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {write_card(weights, results)}", file=sys.stderr)
    return 0
