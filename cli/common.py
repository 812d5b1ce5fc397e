"""Options shared by ``dcar generate`` and ``dcar edit``, and turning them into SamplingParams."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path

from dcar.cli.argtypes import fail, int_at_least
from dcar.model.devices import device_problem, resolve_device
from dcar.model.knobs import KNOBS, Knob, KnobError, parse_knob, parse_size
from dcar.model.pipeline import Pipeline
from dcar.weights import embedded_weights

# Flag spellings kept from before the knob flags were generated: --guidance, --no-residuals.
FLAG_ALIASES = {"guidance_scale": ("--guidance",), "use_residuals": ("--residuals",)}


def size_arg(text: str) -> tuple[int, int]:
    """``--size``: the one size grammar (model/knobs.py), WIDTHxHEIGHT or one side."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def knob_arg(k: Knob):
    """The argparse ``type`` of a numeric knob: parses and checks it against the knob's bounds."""

    def parse(text: str):
        try:
            return parse_knob(k.name, text)
        except KnobError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = k.name
    return parse


def add_knob_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per sampling knob of model/knobs.py (``--steps``, ``--guidance-scale``, ...); unset: the model's."""
    for k in KNOBS:
        flags = (f"--{k.name.replace('_', '-')}", *FLAG_ALIASES.get(k.name, ()))
        help_text = f"{k.describe()} [default: the model's]"
        if k.type is bool:
            p.add_argument(
                *flags, dest=k.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif k.choices:
            p.add_argument(*flags, dest=k.name, choices=k.choices, default=None, help=help_text)
        else:
            p.add_argument(*flags, dest=k.name, type=knob_arg(k), default=None, help=help_text)


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
DTYPES = ("float32", "float16", "bfloat16")


def output_arg(text: str) -> str:
    """``-o``: a path whose extension names a format Pillow writes (checked before the images are drawn)."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(Path(text).suffix.lower())
    try:  # a few formats are registered but cannot take an RGB image (.xbm) or lack a handler (.h5)
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        reason = f" ({e})" if fmt else ""
        raise argparse.ArgumentTypeError(
            f"the extension picks the image format: .png, .jpg, .webp or another one Pillow writes in RGB, "
            f"got {text!r}{reason}"
        ) from None
    return text


def device_arg(text: str) -> str:
    """``--device``: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps."""
    if not DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


positive_int = int_at_least(1)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """The one ``--device`` of every subcommand that runs a model: default ``auto`` (or $DCAR_DEVICE)."""
    p.add_argument(
        "--device",
        type=device_arg,
        default=os.environ.get("DCAR_DEVICE", "auto"),
        help="auto (CUDA when available), cpu, cuda, cuda:N or mps [env DCAR_DEVICE; "
        f"default: {os.environ.get('DCAR_DEVICE', 'auto')}]",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        default=os.environ.get("DCAR_WEIGHTS", str(embedded_weights())),
        help="weights directory (dcar or official layout), or preset:tiny for a random tiny model "
        "[env DCAR_WEIGHTS; default: the embedded weights/dcar-tiny-shapes]",
    )
    add_device_argument(p)
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="floating-point type of the model (default: fp32 on CPU, fp16 on CUDA)",
    )


def add_sampling_arguments(
    p: argparse.ArgumentParser,
    size_help: str = "WIDTHxHEIGHT or one side, multiples of 32 (default: the model's native size)",
) -> None:
    p.add_argument("prompt", help="the text prompt")
    p.add_argument(
        "-o",
        "--output",
        type=output_arg,
        default="out.png",
        help="output image (.png, .jpg, .webp, ...: the extension picks the format; its folder is created); "
        "with -n > 1, an index is added before the extension",
    )
    p.add_argument("-n", type=positive_int, default=1, help="number of images (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the first image")
    p.add_argument(
        "--size",
        type=size_arg,
        default=None,
        help=size_help,
    )
    add_knob_arguments(p)
    add_model_arguments(p)


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The model of ``--weights`` on ``--device``; an unusable one ends the command with one line, status 2."""
    device = resolve_device(args.device)
    problem = device_problem(device)
    if problem:
        fail(args, f"--device: {problem}")
    try:
        return Pipeline.load(args.weights, device=device, dtype=args.dtype)
    except ValueError as e:  # LoadError (missing, truncated, malformed) and an unknown preset: name
        fail(args, f"--weights: {e}")


def sampling_params(pipe: Pipeline, args: argparse.Namespace) -> list:
    """One SamplingParams per image: the knob flags that were given, the model's defaults for the rest."""
    overrides: dict = {k.name: getattr(args, k.name) for k in KNOBS if getattr(args, k.name) is not None}
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    limit = pipe.text_encoder.max_length
    if pipe.text_encoder.count_tokens(args.prompt) > limit:
        print(
            f"dcar: warning: the prompt is longer than {limit} tokens and will be truncated", file=sys.stderr
        )
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


def check_outputs(args: argparse.Namespace, paths: list[Path]) -> None:
    """Create the folders of ``-o`` and check they take files, before the model is loaded: a path that
    cannot be written ends the command with one line, not a traceback after the images were drawn."""
    for path in paths:
        if path.is_dir():
            fail(args, f"-o: {path} is a directory; give a file name such as {path / 'out.png'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(args, f"-o: cannot create the folder {path.parent}: {e.strerror or e}")
        if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            fail(args, f"-o: {path} is not writable")


def save_results(args: argparse.Namespace, results, paths: list[Path]) -> None:
    from dcar.model.images import tensor_to_pil

    for res, path in zip(results, paths):
        try:
            tensor_to_pil(res.image).save(path)  # Pillow removes a file it created when writing fails
        except OSError as e:
            fail(args, f"-o: cannot write {path}: {e.strerror or e}")
        t = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in res.timings.items())
        print(f"{path}  seed {res.seed}  ({t})")
