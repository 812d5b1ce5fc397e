"""argparse helpers that import nothing heavy (``dcar train --help`` must not wait for torch): ``type=``
converters, and ``fail``, the one-line refusal of a value found unusable after parsing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A converter to an integer of at least ``minimum``; argparse names the flag in its one-line error."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def fail(args: argparse.Namespace, message: str) -> NoReturn:
    """End the command as a bad flag value does: one line on stderr (no traceback), status 2.

    For input the user gave that turns out unusable (a missing file, an unknown name): ``message`` starts
    with the flag or argument it came from, e.g. ``--weights: ...`` or ``PATH: ...``. A failure of the work
    itself (a download that breaks off) is not this: it ends with status 1."""
    print(f"dcar {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
