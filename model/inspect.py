"""Listing and verifying checkpoints: what ``dcar inspect`` and ``dcar fetch-weights`` print.

Entries are ``(name, shape)`` with shapes written as in tests/golden/official-keys/*.tsv
(``AxBxC``, ``scalar`` for 0-d tensors), so the output can be diffed against those key lists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcar.model.config import DC_AR_512, GeneratorConfig, TokenizerConfig, preset
from dcar.model.loading import LoadError, check_keys, find_weights, read_state_dict, state_dict_shapes
from dcar.model.pipeline import official_tokenizer_config
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


def build_on_meta(cfg: TokenizerConfig | GeneratorConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return DCHT(cfg) if isinstance(cfg, TokenizerConfig) else DCARTransformer(cfg)


def preset_entries(name: str) -> list[tuple[str, str]]:
    """Every state-dict entry of a preset, built on the meta device (no memory, no init cost)."""
    module = build_on_meta(preset(name))
    return [(k, shape_str(v.shape)) for k, v in module.state_dict().items()]


def file_entries(path: str | Path) -> list[tuple[str, str]]:
    return [(k, shape_str(v.shape)) for k, v in read_state_dict(path).items()]


def weight_files(path: str | Path) -> list[Path]:
    """The checkpoint files of a weights directory (either layout), or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LoadError(f"{path}: no such file or directory")
    files = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            files.append(find_weights(sub))
        except LoadError:
            continue
    if not files:
        raise LoadError(
            f"{path}: no checkpoint files found (model.safetensors / pytorch_model.bin in subfolders)"
        )
    return files


def verify_official(
    root: str | Path, generator: GeneratorConfig = DC_AR_512, autoencoder: dict | None = None
) -> list[str]:
    """Check an official-layout directory against our presets; returns report lines, raises LoadError.

    ``generator`` / ``autoencoder`` override the architectures (as in ``Pipeline.from_pretrained``).
    """
    root = Path(root)
    lines = []
    tdir = root / "dc-ht"
    tcfg = official_tokenizer_config(tdir, autoencoder)  # LoadError names config.json when it is unusable
    for cfg, wfile in ((tcfg, find_weights(tdir)), (generator, find_weights(root / "dc-ar-512"))):
        state = read_state_dict(wfile)
        check_keys(state_dict_shapes(build_on_meta(cfg)), state, wfile)
        lines.append(f"ok  {wfile}  {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
    t5 = root / "t5-base"
    if not (t5 / "config.json").is_file():
        raise LoadError(f"{t5}: config.json missing (the T5 text encoder directory)")
    lines.append(f"ok  {t5}  (T5 directory)")
    return lines
