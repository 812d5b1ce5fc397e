"""``dcar inspect --preset NAME`` / ``dcar inspect PATH``: print ``name<TAB>shape`` per state-dict entry."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="dc-ht, dc-ar-512, tiny-ht or tiny-ar (built on the meta device)")
    src.add_argument("path", nargs="?", help="a checkpoint file or a weights directory")


def run(args: argparse.Namespace) -> int:
    from dcar.model.inspect import file_entries, preset_entries, weight_files
    from dcar.model.loading import LoadError

    try:
        if args.preset:
            print("name\tshape")
            for name, shape in preset_entries(args.preset):
                print(f"{name}\t{shape}")
            return 0
        files = weight_files(args.path)
        for f in files:
            if len(files) > 1:
                print(f"# {f}")
            print("name\tshape")
            for name, shape in file_entries(f):
                print(f"{name}\t{shape}")
    except (LoadError, ValueError) as e:
        raise SystemExit(f"dcar inspect: {e}") from e
    return 0
