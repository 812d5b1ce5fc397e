"""``dcar bench NAME [args]``: run ``benchmarks/NAME.py`` (sampler, load, peers, gpu) with its arguments.

``--dir`` is dcar's own option, before or after NAME (no benchmark script has a ``--dir``); every other
argument after NAME goes to the script. A ``--dir`` that is not a folder or a NAME it does not hold ends
the command with one line ``dcar bench: error: ...`` and status 2; the script's own exit status is the
command's.
"""

from __future__ import annotations

import argparse
import re
import runpy
import sys
from pathlib import Path

from dcar.cli.argtypes import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark script name in benchmarks/ (e.g. sampler, load)")
    # The scripts are not installed with the package: they live in a source checkout.
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("benchmarks"),
        help="the benchmarks/ folder of a dcar source checkout, before or after NAME (default: ./benchmarks)",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script (all but --dir)")


def take_dir(args: argparse.Namespace) -> None:
    """Move a ``--dir X`` / ``--dir=X`` that followed NAME from the script's arguments into ``args.dir``.

    argparse hands everything after NAME to the script (REMAINDER), so ``dcar bench load --dir X`` used to
    pass ``--dir X`` to load.py and look for it in ./benchmarks. The last ``--dir`` wins, as in argparse.
    """
    rest: list[str] = []
    it = iter(args.args)
    for arg in it:
        if arg == "--dir":
            value = next(it, None)
            if value is None:
                fail(args, "argument --dir: expected one argument")
            args.dir = Path(value)
        elif arg.startswith("--dir="):
            args.dir = Path(arg.removeprefix("--dir="))
        else:
            rest.append(arg)
    args.args = rest


MAIN_BLOCK = re.compile(r"^if __name__ == [\"']__main__[\"']\s*:", re.MULTILINE)


def _is_script(path: Path) -> bool:
    """A benchmark is a script (it has a ``__main__`` block); the others are modules its scripts share."""
    return bool(MAIN_BLOCK.search(path.read_text(errors="replace")))


def run(args: argparse.Namespace) -> int:
    take_dir(args)
    if not args.dir.is_dir():
        fail(
            args,
            f"--dir: {args.dir} is not a folder; run from a dcar source checkout or pass "
            "--dir PATH/TO/benchmarks (the scripts are not part of the installed package)",
        )
    script = args.dir / f"{args.name}.py"
    names = ", ".join(p.stem for p in sorted(args.dir.glob("*.py")) if _is_script(p)) or "none"
    if not script.is_file():
        fail(args, f"NAME: no benchmark {args.name!r} in {args.dir}; available: {names}")
    if not _is_script(script):  # `dcar bench plotting` ran the module, printed nothing and said 0
        fail(args, f"NAME: {script} is a helper of the benchmarks (no __main__ block); available: {names}")
    sys.argv = [str(script), *args.args]
    sys.path.insert(
        0, str(script.parent)
    )  # as `python benchmarks/NAME.py` would: scripts share helpers there
    runpy.run_path(str(script), run_name="__main__")
    return 0
