"""``dcar train tokenizer|generator|export``: the training recipe from the command line.

Every command resumes from the checkpoint in its ``--out`` directory and skips a finished run, so
rerunning a command (or ``make train-tiny``) continues where it stopped. Under
``torchrun --nproc_per_node=N`` the same commands run data-parallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dcar.cli.argtypes import int_at_least
from dcar.cli.train_gpu import add_gpu_arguments, gpu_run, gpu_unpack, refusal

# Set before torch loads its OpenMP runtime: spinning worker threads make a 2-core machine shared with
# other processes several times slower (measured: 0.6 s vs 3.3 s per text-encoder step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _number_above(minimum: float, strict: bool):
    """A converter to a float above ``minimum`` (or at least it); argparse names the flag in its error."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not value == value or (value <= minimum if strict else value < minimum):  # NaN fails too
            words = "above" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be {words} {minimum:g}, got {text}")
        return value

    return convert


def _stage_steps(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        steps = tuple(int(v) for v in parts)
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 0:
        raise argparse.ArgumentTypeError(
            f"must be three whole numbers of at least 0 (stages 1, 2, 3), e.g. 1500,3500,2500; got {text!r}"
        )
    return steps  # type: ignore[return-value]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny-shapes", help="training preset (training/presets.py)")
    p.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the data stream and the initialisation"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available (one GPU per torchrun rank), else CPU",
    )
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads per process")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast precision (auto: bf16 where the hardware has it)",
    )
    p.add_argument(
        "--checkpoint-minutes", type=_number_above(0, False), default=5.0, help="checkpoint interval"
    )
    p.add_argument(
        "--checkpoint-every", type=int_at_least(0), default=0, help="also checkpoint every N steps"
    )
    p.add_argument(
        "--sample-minutes", type=_number_above(0, False), default=10.0, help="sample-grid interval"
    )
    p.add_argument(
        "--stop-at", type=int_at_least(0), default=None, help="stop with a checkpoint at this global step"
    )
    p.add_argument(
        "--fresh", action="store_true", help="delete the run directory's checkpoint (and its record) first"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)

    t = sub.add_parser(
        "tokenizer", help="DC-HT: continuous warm-up, discrete learning, alternate fine-tuning"
    )
    _common(t)
    t.add_argument("--out", required=True, help="run directory (checkpoint, losses.csv, samples/)")
    t.add_argument(
        "--stage-steps",
        type=_stage_steps,
        default=None,
        help="steps of the three stages, e.g. 1500,3500,2500 (the tiny-shapes default)",
    )
    t.add_argument(
        "--batch",
        type=int_at_least(1),
        default=None,
        help="crops per process and step (default: the preset's)",
    )
    t.add_argument(
        "--crop",
        type=int_at_least(1),
        default=None,
        help="training crop size in pixels (default: the preset's)",
    )
    t.add_argument(
        "--lr", type=_number_above(0, True), default=None, help="peak learning rate (default: the preset's)"
    )
    t.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from this tokenizer run or weights directory (required by tiny-shapes-v2, which refines "
        "a trained tokenizer's decoder)",
    )
    t.add_argument(
        "--draw-workers",
        type=int_at_least(0),
        default=0,
        help="processes that draw the scenes ahead (0: this one; a GPU host's idle cores); the batches are the same",
    )

    g = sub.add_parser("generator", help="DC-AR + T5: masked-token CE + residual diffusion loss")
    _common(g)
    g.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer run directory (its checkpoint), or a weights directory whose tokenizer gives the ids",
    )
    g.add_argument("--data", required=True, help="pre-tokenized dataset directory (written if missing)")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument(
        "--steps", type=int_at_least(1), default=None, help="optimizer steps (default: the preset's)"
    )
    g.add_argument(
        "--batch",
        type=int_at_least(1),
        default=None,
        help="images per process and step (default: the preset's)",
    )
    g.add_argument(
        "--lr", type=_number_above(0, True), default=None, help="peak learning rate (default: the preset's)"
    )
    g.add_argument(
        "--num-images",
        type=int_at_least(1),
        default=None,
        help="images to pre-tokenize (default: the preset's)",
    )
    g.add_argument(
        "--draw-workers",
        type=int_at_least(0),
        default=0,
        help="processes that draw the scenes while pre-tokenizing (0: this one); the data are the same",
    )
    g.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from this weights directory's or generator run's generator and text encoder "
        "(a further schedule on the same token ids)",
    )

    add_gpu_arguments(sub)

    e = sub.add_parser("export", help="write a weights directory (Pipeline.save_pretrained layout)")
    e.add_argument("--preset", default="tiny-shapes", help="training preset the runs used")
    e.add_argument(
        "--tokenizer", required=True, help="tokenizer run directory, or a weights directory's tokenizer"
    )
    e.add_argument(
        "--generator",
        required=True,
        help="generator run directory, or a weights directory whose generator and text encoder are kept "
        "(a refined decoder's re-export: the tokenizer's encoder and codebook must be that model's)",
    )
    e.add_argument("--out", required=True, help="weights directory to write")
    e.add_argument("--name", default=None, help="model name stored in the config (default: the preset's)")
    e.add_argument("--guidance-scale", type=float, default=None, help="sampling default to store")
    e.add_argument(
        "--randomize-temperature",
        type=float,
        default=None,
        help="sampling default to store (Gumbel noise on the confidences at the first step)",
    )


def _opts(args: argparse.Namespace, d):
    from dcar.training.runlog import RunOptions, default_precision

    precision = default_precision(d.device) if args.precision == "auto" else args.precision
    return RunOptions(
        seed=args.seed,
        precision=precision,
        checkpoint_minutes=args.checkpoint_minutes,
        checkpoint_every=args.checkpoint_every,
        sample_minutes=args.sample_minutes,
        stop_at=args.stop_at,
        progress_bar=not args.no_progress,
        draw_workers=getattr(args, "draw_workers", 0),
    )


def _refuse(args: argparse.Namespace, message: str) -> int:
    return refusal(args.what, message)


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be (or become) a directory this process writes in; None when it can. Nothing is
    created: a command refused later leaves no empty directory behind."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{path} is a file, not a directory"
    probe = p
    while not probe.exists():  # the nearest existing ancestor must be a directory we may write in
        probe = probe.parent
    if not probe.is_dir():
        return f"{path}: {probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path}: {probe} is not writable"
    return None


def _missing(path: str) -> str | None:
    return None if Path(path).exists() else f"{path}: no such directory"


def run(args: argparse.Namespace) -> int:
    from dcar.training import distributed
    from dcar.training.presets import TRAIN_PRESETS, train_preset, with_overrides

    if args.what == "gpu-run":
        return gpu_run(args)
    if args.what == "gpu-unpack":
        return gpu_unpack(args)
    if args.preset not in TRAIN_PRESETS:
        return _refuse(
            args,
            f"--preset: unknown training preset {args.preset!r}; expected one of {sorted(TRAIN_PRESETS)}",
        )
    if args.what == "export":
        return _export(args, train_preset(args.preset))

    if args.what == "tokenizer":
        preset = with_overrides(
            train_preset(args.preset),
            tokenizer=dict(
                stage_steps=args.stage_steps,
                batch=args.batch,
                crop=args.crop,
                lr=args.lr,
                init_from=args.init_from,
            ),
        )
        steps = ",".join(map(str, preset.tokenizer.stage_steps))
        what = f"(stage steps {steps}) refines a trained tokenizer's decoder"
        needs_init = preset.tokenizer.needs_init
    else:
        preset = with_overrides(
            train_preset(args.preset),
            generator=dict(
                steps=args.steps,
                batch=args.batch,
                lr=args.lr,
                num_images=args.num_images,
                init_from=args.init_from,
            ),
        )
        g = preset.generator
        what = f"({g.steps} steps, peak lr {g.lr:g}) is a further schedule for a trained generator"
        needs_init = g.needs_init
    if needs_init:
        return _refuse(
            args, f"--preset {args.preset} {what}: give it one with --init-from RUN_OR_WEIGHTS_DIR"
        )
    refusal = _flag_refusal(args, preset)
    if refusal:
        return _refuse(args, refusal)

    from dcar.model.loading import LoadError
    from dcar.training.export import ExportError
    from dcar.training.pretokenize import DataMismatch
    from dcar.training.runlog import RunMismatch, stop_on_ctrl_c

    d = distributed.setup(args.device, args.threads)
    try:
        if d.world > 1:  # torchrun's ranks each get the Ctrl-C, not necessarily at the same step
            return _train(args, preset, d)
        with stop_on_ctrl_c():
            return _train(args, preset, d)
    except RunMismatch as e:
        return _refuse(args, f"--out: {e}")
    except DataMismatch as e:
        return _refuse(args, f"--data: {e}")
    except (LoadError, ExportError) as e:  # a bad --init-from: one line, no traceback
        return _refuse(args, str(e))
    except KeyboardInterrupt:
        print(
            f"dcar train {args.what}: interrupted; rerun the same command to resume from its last checkpoint",
            file=sys.stderr,
        )
        return 130
    finally:
        distributed.cleanup()


def _flag_refusal(args: argparse.Namespace, preset) -> str | None:
    """What is wrong with the flags of ``tokenizer`` or ``generator`` that the parser cannot see alone (paths,
    values that depend on the preset), before anything is loaded or written; None when nothing is."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device: cuda asked for, but torch sees no CUDA device here"
    if args.what == "tokenizer":
        r, factor = preset.tokenizer, preset.pipeline.tokenizer.spatial_compression
        if r.crop % factor or r.crop > r.render_size:
            return (
                f"--crop: {r.crop} px must be a multiple of the tokenizer's {factor} px tokens and at most the "
                f"preset's {r.render_size} px scenes"
            )
    else:
        from dcar.training.runlog import is_done
        from dcar.training.trained import is_weights_dir

        tok = Path(args.tokenizer)
        if not is_weights_dir(tok) and not is_done(tok):
            return f"--tokenizer: {tok}: neither a finished tokenizer run (no 'done' file) nor a weights directory"
        why = _unwritable(args.data)
        if why:
            return f"--data: {why}"
    if args.init_from:
        why = _missing(args.init_from)
        if why:
            return f"--init-from: {why}"
    why = _unwritable(args.out)
    return f"--out: {why}" if why else None


def _export(args: argparse.Namespace, preset) -> int:
    from dcar.model.knobs import KnobError, check_knob
    from dcar.model.loading import LoadError
    from dcar.training.export import ExportError, export

    for flag in ("--guidance-scale", "--randomize-temperature"):
        value = getattr(args, flag[2:].replace("-", "_"))
        try:
            if value is not None:
                check_knob(flag[2:].replace("-", "_"), value)
        except KnobError as e:
            return _refuse(args, f"{flag}: {e}")
    for flag in ("--tokenizer", "--generator"):
        why = _missing(getattr(args, flag[2:]))
        if why:
            return _refuse(args, f"{flag}: {why}")
    why = _unwritable(args.out)
    if why:
        return _refuse(args, f"--out: {why}")
    try:
        path = export(
            preset,
            args.tokenizer,
            args.generator,
            args.out,
            name=args.name,
            guidance_scale=args.guidance_scale,
            randomize_temperature=args.randomize_temperature,
        )
    except (ExportError, LoadError, FileNotFoundError) as e:
        return _refuse(args, str(e))
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace, preset, d) -> int:
    from dcar.training import distributed
    from dcar.training.lineage import LINEAGE
    from dcar.training.runlog import interrupted

    out = Path(args.out)
    if args.fresh and d.main:
        # the lineage too: a fresh run may start from another --init-from, whose cost it must count
        for name in ("checkpoint.pt", "done", LINEAGE):
            (out / name).unlink(missing_ok=True)
    distributed.barrier()
    if args.what == "tokenizer":
        from dcar.training.train_tokenizer import train_tokenizer

        summary = train_tokenizer(preset, out, d, _opts(args, d))
    else:
        from dcar.training.train_generator import train_generator

        summary = train_generator(preset, args.tokenizer, args.data, out, d, _opts(args, d))
    if d.main:
        print(json.dumps(summary), file=sys.stderr)
    # Leave together: a rank that tears gloo down while its peer is still saving aborted at exit
    # ("terminate called without an active exception") under CPU contention.
    distributed.barrier()
    if interrupted() and "stopped_at" in summary:  # a Ctrl-C during the last step: finished
        print(
            f"dcar train {args.what}: interrupted at step {summary.get('stopped_at')}, checkpoint written; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0
