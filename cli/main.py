"""The ``dcar`` command: serve, generate, edit, inspect, fetch-weights, train, eval, bench.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``; this
file only wires them, so ``dcar --help`` stays cheap (heavy imports happen inside ``run``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, help); modules are imported lazily
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dcar.server.serve", "run the HTTP server (uvicorn)"),
    "generate": ("dcar.cli.generate", "generate images from a prompt"),
    "edit": ("dcar.cli.edit", "inpaint the masked part of an image"),
    "inspect": ("dcar.cli.inspect", "print name<TAB>shape of every state-dict entry of a preset or checkpoint"),
    "fetch-weights": ("dcar.cli.fetch", "download the official DC-HT, DC-AR-512 and T5-base weights and verify them"),
    "train": ("dcar.cli.train", "train the tokenizer or the generator (see README: training)"),
    "eval": ("dcar.cli.eval", "ShapesEval and reconstruction metrics of a weights directory"),
    "bench": ("dcar.cli.bench", "run a benchmark script from benchmarks/"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcar", description="DC-AR text-to-image: server, sampling, training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported: OpenMP's busy-waiting threads slow a CPU generation ~100x when another
    # process shares the cores (measured on a 2-core machine); passive waiting costs nothing alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
