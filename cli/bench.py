"""``dcar bench NAME [args]``: run ``benchmarks/NAME.py`` (sampler, load, peers, gpu) with its arguments."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark script name in benchmarks/ (e.g. sampler, load)")
    # The scripts are not installed with the package: they live in a source checkout.
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("benchmarks"),
        help="the benchmarks/ folder of a dcar source checkout (default: ./benchmarks)",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise SystemExit(
            f"dcar bench: {args.dir} is not a folder; run from a dcar source checkout or pass "
            "--dir PATH/TO/benchmarks (the scripts are not part of the installed package)"
        )
    script = args.dir / f"{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in args.dir.glob("*.py"))
        raise SystemExit(f"dcar bench: no benchmark {args.name!r}; available: {names}")
    sys.argv = [str(script), *args.args]
    sys.path.insert(
        0, str(script.parent)
    )  # as `python benchmarks/NAME.py` would: scripts share helpers there
    runpy.run_path(str(script), run_name="__main__")
    return 0
