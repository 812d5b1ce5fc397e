"""``dcar fetch-weights DIR``: download the official checkpoints (on a machine that reaches the Hub).

Writes the official layout that ``Pipeline.from_pretrained(DIR)`` loads: ``DIR/dc-ht``, ``DIR/dc-ar-512``,
``DIR/t5-base``; then verifies every key and shape against our presets.
"""

from __future__ import annotations

import argparse
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
    from dcar.model.inspect import verify_official
    from dcar.model.loading import LoadError

    root = Path(args.dir)
    if not args.verify_only:
        from huggingface_hub import snapshot_download

        for sub, (repo, patterns) in REPOS.items():
            print(f"fetching {repo} -> {root / sub}")
            snapshot_download(
                repo_id=repo, local_dir=str(root / sub), allow_patterns=patterns, revision=args.revision
            )
    try:
        for line in verify_official(root):
            print(line)
    except (LoadError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"dcar fetch-weights: verification failed: {e}") from e
    print(f"verified; serve with: DCAR_WEIGHTS={root} dcar serve  (or dcar generate --weights {root} ...)")
    return 0
