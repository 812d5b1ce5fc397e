"""``dcar bench NAME [args]``: run ``benchmarks/NAME.py`` (sampler, load, peers, gpu) with its arguments."""

from __future__ import annotations

import argparse
import runpy
import sys

from model.pipeline import REPO_ROOT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark script name in benchmarks/ (e.g. sampler, load)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def run(args: argparse.Namespace) -> int:
    script = REPO_ROOT / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py"))
        raise SystemExit(f"dcar bench: no benchmark {args.name!r}; available: {names}")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/NAME.py` would: scripts share helpers there
    runpy.run_path(str(script), run_name="__main__")
    return 0
