"""Per-stage time and images/s of the sampler (direct Pipeline calls, no HTTP).

Rows: the tiny preset at 256 and 512 px, batch 1 and 8, and the full-size dc-ar-512 preset with random
weights at 512 px, batch 1 (skip with --no-full). ``--weights [LABEL=]DIR`` (repeatable) adds rows for
trained weights at their default size and sampling settings, batch 1 and 8 (``--batches``): old and new
weights side by side in one run (``--no-presets`` leaves only those). Medians over --repeat runs after one warm-up run.

    python benchmarks/sampler.py [--device cuda] [--dtype float16] [--repeat 3] [--no-full]
    python benchmarks/sampler.py --no-presets --weights old=/tmp/old-weights --weights new=weights/dcar-tiny-shapes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import torch

from dcar.model.config import PIPELINE_PRESETS, T5_BASE
from dcar.model.pipeline import Pipeline
from dcar.model.sampler import Sampler, SamplerOptions

STAGES = ("text_encode", "unmask", "residual", "decode")


def measure(pipe: Pipeline, size: int, batch: int, repeat: int) -> dict:
    params = [pipe.params(f"a red circle number {i}", seed=i, height=size, width=size) for i in range(batch)]
    pipe.generate(params)  # warm-up: allocator, kernels, position tables
    walls, stages = [], {s: [] for s in STAGES}
    for _ in range(repeat):
        t0 = time.perf_counter()
        results = pipe.generate(params)
        walls.append(time.perf_counter() - t0)
        for s in STAGES:
            stages[s].append(results[0].timings.get(s, 0.0))
    wall = statistics.median(walls)
    return {"wall": wall, "img_s": batch / wall, **{s: statistics.median(v) for s, v in stages.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the full-size dc-ar-512 row")
    ap.add_argument(
        "--weights", action="append", default=[], metavar="[LABEL=]DIR", help="trained weights rows"
    )
    ap.add_argument("--no-presets", action="store_true", help="only the --weights rows")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the --weights rows")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    # (preset, size, batch, channels-last decoder); the two 512 x 8 rows are the decoder-layout A/B.
    cases = [("tiny", s, b, False) for s in (256, 512) for b in (1, 8)] + [("tiny", 512, 8, True)]
    if not args.no_full:
        cases.append(("dc-ar-512", 512, 1, False))
    if args.no_presets:
        cases = []
    pipes: dict[str, Pipeline] = {}
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for (
        spec
    ) in args.weights:  # at the weights' own defaults (guidance, residual steps), as a server runs them
        label, _, path = spec.rpartition("=")
        pipe = Pipeline.from_pretrained(path, device=args.device, dtype=args.dtype)
        label = label or pipe.name
        size = pipe.config.sampling.size
        rows += [(label, size, batch, measure(pipe, size, batch, args.repeat)) for batch in batches]
        pipes.setdefault(label, pipe)
    for preset, size, batch, channels_last in cases:
        if preset not in pipes:
            cfg = PIPELINE_PRESETS[preset]
            if preset == "dc-ar-512":  # no T5 vocabulary here: a T5-base-sized encoder on bytes
                cfg = replace(cfg, text_encoder=replace(T5_BASE, tokenizer="byt5", vocab_size=384))
            pipes[preset] = Pipeline.from_config(cfg, device=args.device, dtype=args.dtype, name=preset)
        pipe = pipes[preset]
        pipe.sampler = Sampler(
            pipe.generator,
            pipe.tokenizer,
            pipe.text_encoder,
            SamplerOptions(channels_last_decoder=channels_last),
        )
        rows.append(
            (
                preset + (" (CL)" if channels_last else ""),
                size,
                batch,
                measure(pipe, size, batch, args.repeat),
            )
        )

    pipe = next(iter(pipes.values()))
    print(
        f"# sampler benchmark: device={pipe.device} dtype={str(pipe.dtype).replace('torch.', '')} "
        f"threads={torch.get_num_threads()} torch={torch.__version__} cpu={platform.processor() or platform.machine()}"
    )
    print(
        "# 12 unmasking steps; presets: CFG 4.5, head steps = preset default (tiny 8, dc-ar-512 32); weights: "
        "their own defaults; median of "
        f"{args.repeat} runs; stage times are per batch (every row shares them); (CL) = channels-last decoder"
    )
    head = (
        f"| {'preset':<10} | {'size':>4} | {'batch':>5} | {'text ms':>8} | {'unmask ms':>9} | {'head ms':>8} "
        f"| {'decode ms':>9} | {'total ms':>9} | {'images/s':>8} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for preset, size, batch, m in rows:
        print(
            f"| {preset:<10} | {size:>4} | {batch:>5} | {m['text_encode'] * 1e3:>8.1f} | {m['unmask'] * 1e3:>9.1f} "
            f"| {m['residual'] * 1e3:>8.1f} | {m['decode'] * 1e3:>9.1f} | {m['wall'] * 1e3:>9.1f} | {m['img_s']:>8.3g} |"
        )


if __name__ == "__main__":
    main()
