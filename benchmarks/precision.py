"""How far float16 and bfloat16 images are from float32 ones, with the committed embedded model.

    python benchmarks/precision.py                # 16 ShapesEval prompts x 2 seeds at 256 px, CPU
    python benchmarks/precision.py --device cuda  # the same on a GPU

Prints per dtype: non-finite rows, the share of token ids equal to float32's, mean and max |image - float32
image| in [0, 1] units, and seconds per image. The tests hold the 128 px version of this to 0.02 / 0.05.
"""

from __future__ import annotations

import argparse
import time

import torch

from dcar.model.pipeline import Pipeline
from dcar.training.shapes_eval import EVAL_PROMPTS
from dcar.weights import embedded_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    args = ap.parse_args()
    prompts = [s.prompt for s in EVAL_PROMPTS[::3][: args.prompts]]
    ref = None
    print(f"# {len(prompts)} prompts x 2 seeds, {args.size} px, {args.device}, torch {torch.__version__}")
    print("| dtype | non-finite rows | tokens equal to fp32 | mean abs diff | max abs diff | s/image |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        pipe = Pipeline.from_pretrained(embedded_weights(), device=args.device, dtype=dtype)
        params = [pipe.params(p, seed=s, height=args.size, width=args.size) for p in prompts for s in (0, 3)]
        t0 = time.perf_counter()
        results = pipe.generate(params)
        per_image = (time.perf_counter() - t0) / len(results)
        images = torch.stack([r.image for r in results])
        tokens = torch.stack([r.tokens for r in results])
        bad = sum(not r.finite for r in results)
        if ref is None:
            ref = (images, tokens)
        diff = (images - ref[0]).abs()
        same = (tokens == ref[1]).float().mean().item()
        print(
            f"| {dtype} | {bad} | {same:.3f} | {diff.mean().item():.4f} | {diff.max().item():.3f} | "
            f"{per_image:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
