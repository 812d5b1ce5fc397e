"""The ``dcar`` command: serve, generate, edit, inspect, fetch-weights, train, eval, bench.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``; this
file only wires them, so ``dcar --help`` stays cheap (heavy imports happen inside ``run``).

Conventions every subcommand gets from here: ``--help`` shows each option's default (and, for ``dcar serve``,
the ``DCAR_*`` variable behind it), and a bad value ends the command with status 2 and one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from dcar import __version__

# name -> (module, help); modules are imported lazily
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dcar.server.serve", "run the HTTP server (uvicorn)"),
    "generate": ("dcar.cli.generate", "generate images from a prompt"),
    "edit": ("dcar.cli.edit", "inpaint the masked part of an image"),
    "inspect": (
        "dcar.cli.inspect",
        "print name<TAB>shape of every state-dict entry of a preset or checkpoint",
    ),
    "fetch-weights": (
        "dcar.cli.fetch",
        "download the official DC-HT, DC-AR-512 and T5-base weights and verify them",
    ),
    "train": ("dcar.cli.train", "train the tokenizer or the generator (see README: training)"),
    "eval": ("dcar.cli.eval", "ShapesEval and reconstruction metrics of a weights directory"),
    "bench": ("dcar.cli.bench", "run a benchmark script from benchmarks/"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default.

    Options whose default is None or False (flags, "unset means the model's own value") say so in their
    own words instead: "(default: None)" would tell the reader nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default is None
            or action.default is False
            or action.default in ("", argparse.SUPPRESS)
        ):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """``argparse`` with the defaults formatter, and errors as one line: ``dcar serve: error: ...``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # An option without help text would show no default at all: give it one that states the default.
        default = kwargs.get("default")
        if (
            kwargs.get("help") is None
            and default is not None
            and default is not False
            and args[0].startswith("-")
        ):
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> Parser:
    """The whole ``dcar`` parser; only the subcommand ``only`` gets its options (that imports its module)."""
    parser = Parser(prog="dcar", description="DC-AR text-to-image: server, sampling, training.")
    parser.add_argument("--version", action="version", version=f"dcar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser, for errors found after parsing
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).add_arguments(p)
            if name == "serve":
                from dcar.cli.serve_flags import describe_settings

                describe_settings(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # output still buffered (argparse's --help exits with it) meets a closed pipe here
            sys.stdout.flush()
    except BrokenPipeError:
        # `dcar inspect ... | head` closed the pipe: end quietly, as a command killed by SIGPIPE would (the
        # traceback was noise), and point stdout at /dev/null so that the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
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
    if args.command == "serve":
        from dcar.cli.serve_flags import check_settings

        check_settings(args, parser.commands["serve"])
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
