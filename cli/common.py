"""Options shared by ``dcar generate`` and ``dcar edit``, and turning them into SamplingParams."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dcar.model.pipeline import Pipeline
from dcar.weights import embedded_weights


def parse_size(text: str) -> tuple[int, int]:
    """'512' or '512x384' (width x height) -> (width, height)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must look like 512 or 512x512, got {text!r}") from e
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size must look like 512 or 512x512, got {text!r}")
    return parts[0], parts[1]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=os.environ.get("DCAR_WEIGHTS", str(embedded_weights())),
                   help="weights directory (dcar or official layout), or preset:tiny for a random tiny model "
                        "(default: $DCAR_WEIGHTS or the embedded weights/dcar-tiny-shapes)")
    p.add_argument("--device", default=os.environ.get("DCAR_DEVICE", "cpu"), help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU, fp16 on CUDA)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="out.png", help="output image (.png, .jpg, .webp); with -n > 1, "
                   "an index is added before the extension")
    p.add_argument("-n", type=int, default=1, help="number of images (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="unmasking steps (default: the model's, 12)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--size", type=parse_size, default=None, help="WxH, multiples of 32 (default: native size)")
    p.add_argument("--residual-steps", type=int, default=None, help="diffusion-head steps (default 32)")
    p.add_argument("--no-residuals", action="store_true", help="decode the discrete tokens only (ablation)")
    add_model_arguments(p)


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    return Pipeline.load(args.weights, device=args.device, dtype=args.dtype)


def sampling_params(pipe: Pipeline, args: argparse.Namespace) -> list:
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.guidance is not None:
        overrides["guidance_scale"] = args.guidance
    if args.residual_steps is not None:
        overrides["residual_steps"] = args.residual_steps
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    if args.no_residuals:
        overrides["use_residuals"] = False
    if args.n < 1:
        raise SystemExit("dcar: -n must be >= 1")
    limit = pipe.text_encoder.max_length
    if pipe.text_encoder.count_tokens(args.prompt) > limit:
        print(f"dcar: warning: the prompt is longer than {limit} tokens and will be truncated", file=sys.stderr)
    return [pipe.params(args.prompt, seed=args.seed + i, **overrides) for i in range(args.n)]


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def run_with_progress(pipe: Pipeline, params: list, edits=None):
    """Generate with a progress bar over the unmasking steps (stderr)."""
    from tqdm import tqdm

    total = max(p.steps for p in params)
    with tqdm(total=total, desc="unmasking", unit="step", file=sys.stderr, leave=False) as bar:
        def callback(events, state):
            bar.n = max((e.step for e in events), default=bar.n)
            bar.refresh()

        return pipe.generate(params, edits, callback=callback)


def save_results(results, paths: list[Path]) -> None:
    from dcar.model.images import tensor_to_pil

    for res, path in zip(results, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor_to_pil(res.image).save(path)
        t = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in res.timings.items())
        print(f"{path}  seed {res.seed}  ({t})")
