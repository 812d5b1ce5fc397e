"""``dcar inspect --preset NAME`` / ``dcar inspect PATH``: print ``name<TAB>shape`` per state-dict entry.

An unknown preset or a PATH that is missing or holds no readable checkpoint ends the command before it
prints anything, with one line ``dcar inspect: error: --preset: ...`` / ``... PATH: ...`` and status 2.
"""

from __future__ import annotations

import argparse
import os

from dcar.cli.argtypes import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="dc-ht, dc-ar-512, tiny-ht or tiny-ar (built on the meta device)")
    src.add_argument("path", nargs="?", help="a checkpoint file or a weights directory")


def run(args: argparse.Namespace) -> int:
    if args.path and not os.path.lexists(args.path):  # before importing torch: a typo answers in ms, not 8 s
        fail(args, f"PATH: {args.path}: no such file or directory")
    from dcar.model.inspect import file_entries, preset_entries, weight_files

    if args.preset:
        try:
            entries = preset_entries(args.preset)
        except ValueError as e:  # an unknown name, with the known ones
            fail(args, f"--preset: {e}")
        print("name\tshape")
        for name, shape in entries:
            print(f"{name}\t{shape}")
        return 0
    try:  # every file is read before anything is printed: a bad one refuses the whole PATH
        listed = [(f, file_entries(f)) for f in weight_files(args.path)]
    except ValueError as e:  # LoadError: missing, unreadable or not a checkpoint, naming the file
        fail(args, f"PATH: {e}")
    except OSError as e:  # a folder that cannot be listed, a file that cannot be opened
        fail(args, f"PATH: {e.filename or args.path}: {e.strerror or e}")
    for f, entries in listed:
        if len(listed) > 1:
            print(f"# {f}")
        print("name\tshape")
        for name, shape in entries:
            print(f"{name}\t{shape}")
    return 0
