"""``dcar train gpu-run`` and ``gpu-unpack``: one bounded run for a lent GPU, and the way its result comes back.

Apart from cli/train.py's recipe commands because they take other flags: a wall-clock budget rather than
steps, and the parts a GPU host returns (docs/training.md, "A lent GPU for a few minutes").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def refusal(what: str, message: str) -> int:
    """One line naming the subcommand and (first in ``message``) the flag at fault; status 2."""
    print(f"dcar train {what}: error: {message}", file=sys.stderr)
    return 2


def add_gpu_arguments(sub) -> None:
    from dcar.training.gpu_run import GpuRunConfig

    c = GpuRunConfig(weights=None)  # type: ignore[arg-type]  # only its defaults are read here
    r = sub.add_parser(
        "gpu-run",
        help="one bounded run for a lent GPU: a generator (and with --tokenizer-minutes its tokenizer first) "
        "trained for --minutes, packed for the way back",
    )
    r.add_argument("--out", required=True, help="where the parts and report.md go (a GPU host's $OUT)")
    r.add_argument("--work", default="runs/gpu-run", help="scratch: pre-tokenized scenes, the runs")
    r.add_argument("--preset", default="tiny-shapes", help="the architecture and the training recipes")
    r.add_argument("--weights", default=None, help="weights directory whose tokenizer gives the ids "
                   "(default: the embedded model)")  # fmt: skip
    r.add_argument("--minutes", type=float, default=c.minutes, help="wall-clock budget of the whole command")
    r.add_argument("--tokenizer-minutes", type=float, default=c.tokenizer_minutes,
                   help="train the preset's tokenizer from scratch first, within this many of the minutes "
                   "(its stages scaled to fit; default 0: the tokenizer of --weights)")  # fmt: skip
    r.add_argument("--scenes", type=int, default=c.scenes, help="scenes to pre-tokenize")
    r.add_argument("--batch", type=int, default=c.batch, help="images per step")
    r.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    r.add_argument(
        "--max-steps", type=int, default=None, help="at most this many steps (default: the budget's)"
    )
    r.add_argument(
        "--probe-steps",
        type=int,
        default=c.probe_steps,
        help="steps timed before a run (the generator's, and each tokenizer stage's)",
    )
    r.add_argument("--reserve-s", type=float, default=c.reserve_s, help="seconds kept for export and packing")
    r.add_argument(
        "--draw-workers", type=int, default=None, help="scene-drawing processes (default: cores - 1)"
    )
    r.add_argument("--seed", type=int, default=c.seed, help="seed of the scenes and the initialisation")
    r.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available"
    )
    r.add_argument("--threads", type=int, default=None, help="CPU threads")

    u = sub.add_parser("gpu-unpack", help="rebuild gpu-run's weights directory from its parts")
    u.add_argument("parts", help="directory holding run-<checksum>.tar.00-of-MM, ... (and report.md)")
    u.add_argument("--out", required=True, help="weights directory to write (an evaluated one keeps its card "
                   "in previous/)")  # fmt: skip


def gpu_run(args: argparse.Namespace) -> int:
    from dcar.model.loading import LoadError
    from dcar.training import distributed
    from dcar.training.export import ExportError
    from dcar.training.gpu_run import GpuRunConfig, format_report, gpu_run
    from dcar.training.presets import train_preset
    from dcar.weights import embedded_weights

    def refuse(message: str) -> int:
        return refusal("gpu-run", message)

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return refuse("one process: every torchrun rank would export and pack the same files")
    positive = (lambda v: v > 0, "positive")
    whole = (lambda v: v >= 1, "at least 1")
    at_least_0 = (lambda v: v >= 0, "at least 0")
    checks = {"minutes": positive, "lr": positive, "scenes": whole, "batch": whole, "probe_steps": whole,
              "max_steps": whole, "reserve_s": at_least_0, "draw_workers": at_least_0,
              "tokenizer_minutes": at_least_0}  # fmt: skip
    for name, (ok, words) in checks.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            return refuse(f"--{name.replace('_', '-')} must be {words}, got {value}")
    if args.tokenizer_minutes and args.weights:
        return refuse("--weights names a tokenizer to use, --tokenizer-minutes trains one: give one of them")
    if args.tokenizer_minutes and args.tokenizer_minutes > args.minutes - 1:
        return refuse(
            f"--tokenizer-minutes {args.tokenizer_minutes:g} leaves under a minute of --minutes "
            f"{args.minutes:g} for pre-tokenizing and the generator"
        )
    cfg = GpuRunConfig(
        weights=Path(args.weights) if args.weights else embedded_weights(),
        minutes=args.minutes,
        tokenizer_minutes=args.tokenizer_minutes,
        scenes=args.scenes,
        batch=args.batch,
        lr=args.lr,
        probe_steps=args.probe_steps,
        reserve_s=args.reserve_s,
        max_steps=args.max_steps,
        draw_workers=args.draw_workers
        if args.draw_workers is not None
        else max(0, (os.cpu_count() or 1) - 1),
        seed=args.seed,
    )
    d = distributed.setup(args.device, args.threads)
    try:
        report = gpu_run(train_preset(args.preset), cfg, Path(args.work), Path(args.out), d)
    except (LoadError, ExportError, FileNotFoundError, ValueError) as e:
        return refuse(str(e))
    print(format_report(report))
    return 0


def gpu_unpack(args: argparse.Namespace) -> int:
    from dcar.training.gpu_run import unpack

    try:
        print(f"wrote {unpack(Path(args.parts), Path(args.out))}")
    except (FileNotFoundError, ValueError) as e:
        return refusal("gpu-unpack", str(e))
    return 0
