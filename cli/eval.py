"""``dcar eval WEIGHTS``: ShapesEval, the tokenizer ceiling, reconstruction PSNR/SSIM and hybrid vs
discrete-only of a weights directory; ``--write-card`` also writes its model card (README.md), sample grid
and eval.json. ``--tokenizer-ceiling`` measures the ceiling alone, of a weights directory or of a tokenizer
run directory (its checkpoint.pt, mid-training too). ``--sweep`` scores a grid of sampling knobs on the
tuning prompts; ``--explain`` prints why stored ShapesEval images failed."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see cli/train.py

from dcar.cli.common import add_device_argument  # noqa: E402
from dcar.model.devices import device_problem, resolve_device  # noqa: E402

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
        default=None,
        help="ShapesEval's prompts, or held-out ones of the same categories for tuning defaults "
        "(default: shapes-eval; tuning with --sweep)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KNOB=V1,V2,...",
        help="ShapesEval only, once per combination of knob values (repeat for more knobs, e.g. "
        "--sweep guidance_scale=1,1.5,3 --sweep randomize_temperature=0,0.5); one table row each",
    )
    parser.add_argument("--eval-split", default="runs/eval-split", help="evaluation split directory")
    parser.add_argument("--num-eval", type=int, default=100, help="evaluation-split scenes used")
    parser.add_argument("--recon-sizes", default="256,512")
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of: shapes, discrete, ceiling, recon, hybrid (default: skip nothing)",
    )
    parser.add_argument(
        "--tokenizer-ceiling",
        action="store_true",
        help="only the tokenizer ceiling (ShapesEval of ground-truth scenes after encode -> decode per path); "
        "WEIGHTS may be a tokenizer run directory; with --write-card it is merged into the existing eval.json",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="measure nothing: print the ShapesEval tables and why its images failed from WEIGHTS/eval.json "
        "(or from WEIGHTS itself when it is a results file written by --json)",
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


def _error(message: str) -> int:
    print(f"dcar eval: error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace):
    """The pipeline of WEIGHTS in float32 (the reported numbers must not depend on where they were measured),
    or None after one line on stderr when WEIGHTS or --device cannot be used."""
    import torch

    from dcar.model.pipeline import Pipeline

    device = resolve_device(args.device)
    problem = device_problem(device)
    if problem:
        _error(f"--device: {problem}")
        return None
    try:
        return Pipeline.from_pretrained(args.weights, device=device, dtype=torch.float32)
    except ValueError as e:  # LoadError: missing, truncated or malformed, naming the file
        _error(f"WEIGHTS: {e}")
        return None


def _run_ceiling_only(args: argparse.Namespace, seeds: tuple[int, ...]) -> int:
    """The ceiling of a weights directory or a tokenizer run directory; --write-card merges it into eval.json."""
    from dcar.training.ceiling import format_ceiling, tokenizer_ceiling
    from dcar.training.model_card import RESULTS, write_card
    from dcar.training.presets import train_preset
    from dcar.training.runlog import load_checkpoint
    from dcar.training.trained import load_trained_tokenizer

    path = Path(args.weights)
    device = resolve_device(args.device)
    if (path / "checkpoint.pt").is_file():
        if args.write_card:
            return _error(f"--write-card: needs a weights directory, and {path} is a tokenizer run")
        ckpt = load_checkpoint(path)
        if ckpt is None or ckpt.get("kind") != "tokenizer":
            return _error(f"WEIGHTS: {path} holds a checkpoint.pt that is not a tokenizer run's")
        tok = load_trained_tokenizer(path, train_preset(ckpt["preset"]["name"])).to(device)
        where = f"stage {ckpt['stage'] + 1}, step {ckpt['step']}"
    else:
        pipe = _load(args)
        if pipe is None:
            return 2
        tok, where = pipe.tokenizer, str(path)
    result = {"source": where, **tokenizer_ceiling(tok, args.size, seeds)}
    print(format_ceiling(result))
    print(f"({where})", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.write_card:
        results = json.loads((path / RESULTS).read_text()) if (path / RESULTS).is_file() else {}
        results["tokenizer_ceiling"] = result
        (path / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {write_card(path, results)}", file=sys.stderr)
    return 0


# A measurement's flags, and --json (where one is written: a results file to explain is given as WEIGHTS)
_MEASURING_FLAGS = {
    "--sweep": "sweep",
    "--tokenizer-ceiling": "tokenizer_ceiling",
    "--write-card": "write_card",
    "--guidance-scale": "guidance_scale",
    "--json": "json",
}


def _explain(args: argparse.Namespace) -> int:
    """The ShapesEval and failure tables of stored results; no model is loaded."""
    from dcar.training.failure_modes import format_failures
    from dcar.training.model_card import RESULTS
    from dcar.training.shapes_eval import format_results

    measuring = [flag for flag, on in _MEASURING_FLAGS.items() if getattr(args, on) not in (None, False, [])]
    if measuring:  # refused rather than ignored: the user asked for a measurement that would not happen
        print(
            f"--explain measures nothing; it cannot be combined with {', '.join(measuring)}", file=sys.stderr
        )
        return 2
    path = Path(args.weights)
    source = path / RESULTS if path.is_dir() else path
    if not source.is_file():
        print(f"{source}: no results to explain (run `dcar eval {path} --write-card` first)", file=sys.stderr)
        return 2
    try:
        stored = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        print(f"{source}: not a results file (not valid JSON: {e})", file=sys.stderr)
        return 2
    shapes = stored.get("shapes_eval") if isinstance(stored, dict) else None
    if not shapes or not shapes.get("prompts"):
        print(f"{source}: no per-image ShapesEval results (evaluated with --skip shapes?)", file=sys.stderr)
        return 2
    print(format_results(shapes, per_prompt=args.per_prompt))
    print()
    print(format_failures(shapes))
    return 0


def _sweep(args: argparse.Namespace, seeds: tuple[int, ...]) -> int:
    """ShapesEval over a grid of sampling knobs (tuning prompts unless told otherwise)."""
    from dcar.training.sweep import format_sweep, parse_sweep

    try:
        grid = parse_sweep(args.sweep)
    except ValueError as e:
        return _error(str(e))  # names the --sweep value
    if args.write_card:
        return _error("--write-card: a --sweep writes no card (export the chosen defaults, then evaluate)")

    from dcar.training.evaluate import tuning_prompts
    from dcar.training.shapes_eval import EVAL_PROMPTS
    from dcar.training.sweep import run_sweep

    pipe = _load(args)
    if pipe is None:
        return 2
    prompts = tuning_prompts() if args.prompts == "tuning" else EVAL_PROMPTS
    t0 = time.monotonic()
    rows = run_sweep(pipe, grid, prompts, size=args.size, steps=args.steps, seeds=seeds)
    print(format_sweep(rows))
    print(f"({args.prompts} prompts; {time.monotonic() - t0:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weights": str(args.weights), "prompts": args.prompts, "sweep": rows}, f, indent=1)
    return 0


def run(args: argparse.Namespace) -> int:
    args.prompts = args.prompts or ("tuning" if args.sweep else "shapes-eval")
    if args.explain:
        return _explain(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        return _error(f"--seeds: a comma list of whole numbers (e.g. 0,1,2,3), got {args.seeds!r}")
    if args.json and not Path(args.json).parent.is_dir():  # not only after the whole evaluation
        return _error(f"--json: the folder of {args.json} does not exist")
    if args.sweep:
        return _sweep(args, seeds)
    if args.tokenizer_ceiling:
        return _run_ceiling_only(args, seeds)

    from dcar.training.ceiling import format_ceiling, tokenizer_ceiling
    from dcar.training.evaluate import (
        eval_split,
        hybrid_vs_discrete,
        reconstruction,
        sample_grid,
        shapes_eval,
        tuning_prompts,
    )
    from dcar.training.failure_modes import format_failures
    from dcar.training.model_card import RESULTS, SAMPLES, write_card
    from dcar.training.shapes_eval import format_results

    skip = {s for s in args.skip.split(",") if s}
    pipe = _load(args)
    if pipe is None:
        return 2
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
        print(format_failures(results["shapes_eval"]))
        if "discrete" not in skip:
            results["shapes_eval_discrete"] = shapes_eval(
                pipe, args.size, args.steps, seeds, use_residuals=False, **overrides
            )
            print(f"without residuals: overall {results['shapes_eval_discrete']['overall']:.3f}")
    if "ceiling" not in skip:
        prompts = overrides.get("prompts")
        results["tokenizer_ceiling"] = tokenizer_ceiling(
            pipe.tokenizer, args.size, seeds, **({"prompts": prompts} if prompts else {})
        )
        print(format_ceiling(results["tokenizer_ceiling"]))
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
        weights = Path(args.weights)
        if (weights / RESULTS).is_file():  # hand-written card notes (a run's history) survive re-evaluation
            notes = json.loads((weights / RESULTS).read_text()).get("card_notes")
            if notes:
                results["card_notes"] = notes
        sample_grid(pipe, CARD_PROMPTS, seeds=(0, 1), size=args.size).save(weights / SAMPLES)
        (weights / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {write_card(weights, results)}", file=sys.stderr)
    return 0
