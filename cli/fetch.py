"""``dcar fetch-weights DIR``: download the official checkpoints (on a machine that reaches the Hub).

Writes the official layout that ``Pipeline.from_pretrained(DIR)`` loads: ``DIR/dc-ht``, ``DIR/dc-ar-512``,
``DIR/t5-base``; then verifies every key and shape against our presets.

Exit status: 2 with one line ``dcar fetch-weights: error: DIR: ...`` (or ``--revision: ...``) for input that
cannot be used: a DIR that is a file or cannot be created, a ``--revision`` the Hub does not have, and with
``--verify-only`` a DIR whose files fail the check (naming the file). 1 with one line when the work itself
fails: a download that breaks off, or downloaded files that fail the check.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPOS = {
    "dc-ht": ("mit-han-lab/dc-ht", ["*.json", "*.safetensors", "pytorch_model.bin"]),
    "dc-ar-512": ("mit-han-lab/dc-ar-512", ["*.json", "pytorch_model.bin", "*.safetensors"]),
    "t5-base": (
        "google-t5/t5-base",
        [
            "config.json",
            "model.safetensors",
            "spiece.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ],
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="target directory (created)")
    p.add_argument("--verify-only", action="store_true", help="do not download, only verify DIR")
    p.add_argument("--revision", default=None, help="a Hub revision for all three repositories")


def run(args: argparse.Namespace) -> int:
    from dcar.cli.argtypes import fail
    from dcar.model.inspect import verify_official

    root = Path(args.dir)
    if root.exists() and not root.is_dir():
        fail(args, f"DIR: {root} is not a folder")
    if args.verify_only:
        if not root.is_dir():
            fail(args, f"DIR: {root}: no such folder (--verify-only checks an earlier download)")
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(args, f"DIR: cannot create {root}: {e.strerror or e}")
        if not os.access(root, os.W_OK | os.X_OK):
            fail(args, f"DIR: {root} is not writable")
        download(args, root)
    try:
        lines = verify_official(root)
    except (ValueError, OSError) as e:  # LoadError names the file (config.json, a checkpoint)
        if args.verify_only:  # the user's own folder
            fail(args, f"DIR: verification failed: {e}")
        raise SystemExit(f"dcar fetch-weights: verification of the download failed: {e}") from None
    for line in lines:
        print(line)
    print(f"verified; serve with: DCAR_WEIGHTS={root} dcar serve  (or dcar generate --weights {root} ...)")
    return 0


def download(args: argparse.Namespace, root: Path) -> None:
    """The three repositories into ``root``; an unknown --revision is status 2, any other failure 1."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RevisionNotFoundError

    from dcar.cli.argtypes import fail

    for sub, (repo, patterns) in REPOS.items():
        print(f"fetching {repo} -> {root / sub}")
        try:
            snapshot_download(
                repo_id=repo, local_dir=str(root / sub), allow_patterns=patterns, revision=args.revision
            )
        except RevisionNotFoundError as e:
            fail(args, f"--revision: {repo} has no revision {args.revision!r} ({first_line(e)})")
        except Exception as e:  # network, Hub or disk: the download failed, not the input
            raise SystemExit(
                f"dcar fetch-weights: downloading {repo} failed: {type(e).__name__}: {first_line(e)}"
            ) from None


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
