"""What a finished (or interrupted) run left: its tokenizer or its generator and text encoder, read from
the run directory's checkpoint, in eval mode on the CPU (export, evaluation and a further run start here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dcar.model.config import GeneratorConfig
from dcar.model.text_encoder import TextEncoder
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer
from dcar.training.presets import TrainPreset
from dcar.training.runlog import load_checkpoint


def is_weights_dir(path: Path) -> bool:
    """A dcar weights directory (``Pipeline.save_pretrained``'s layout), rather than a training run."""
    return (path / "model_index.json").is_file()


def tokenizer_state(path: Path) -> dict[str, torch.Tensor]:
    """A tokenizer's weights: a tokenizer run's checkpoint, or a weights directory's ``tokenizer/``."""
    from dcar.model.loading import LoadError, find_weights, read_state_dict

    if is_weights_dir(path):
        index = json.loads((path / "model_index.json").read_text())
        return read_state_dict(find_weights(path / index["tokenizer"]))
    ckpt = load_checkpoint(path) if path.is_dir() else None
    if ckpt is not None and ckpt.get("kind") == "tokenizer":
        return ckpt["model"]
    raise LoadError(f"{path}: neither a tokenizer run (checkpoint.pt) nor a weights directory")


def load_tokenizer_weights(tok: DCHT, source: str | Path) -> DCHT:
    """``tok`` with the weights of a tokenizer run or of a weights directory (keys and shapes checked)."""
    from dcar.model.loading import check_keys, state_dict_shapes

    state = tokenizer_state(Path(source))
    check_keys(state_dict_shapes(tok), state, Path(source))
    tok.load_state_dict(state)
    return tok


def load_trained_tokenizer(source: str | Path, preset: TrainPreset) -> DCHT:
    """The tokenizer of a tokenizer run or of a weights directory, in eval mode."""
    return load_tokenizer_weights(DCHT(preset.pipeline.tokenizer), source).eval()


def load_trained_generator(
    run_dir: str | Path, preset: TrainPreset, ema: bool = True
) -> tuple[DCARTransformer, TextEncoder, GeneratorConfig]:
    """Generator and text encoder of a generator run (the EMA weights when the run kept them)."""
    ckpt = load_checkpoint(Path(run_dir))
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no generator checkpoint")
    if ckpt.get("kind") != "generator":
        raise FileNotFoundError(f"{run_dir}: not a generator run (a {ckpt.get('kind')} checkpoint)")
    cfg = GeneratorConfig.from_dict(ckpt["generator_config"])
    gen, text = DCARTransformer(cfg), TextEncoder.from_config(preset.pipeline.text_encoder)
    use_ema = ema and "ema_generator" in ckpt
    gen.load_state_dict(ckpt["ema_generator" if use_ema else "generator"])
    text.load_state_dict(ckpt["ema_text" if use_ema else "text"])
    return gen.eval(), text.eval(), cfg
