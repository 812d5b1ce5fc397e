"""What a finished (or interrupted) run left: its tokenizer or its generator and text encoder, read from
the run directory's checkpoint, in eval mode on the CPU (export, evaluation and a further run start here)."""

from __future__ import annotations

from pathlib import Path

from dcar.model.config import GeneratorConfig
from dcar.model.text_encoder import TextEncoder
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer
from dcar.training.presets import TrainPreset
from dcar.training.runlog import load_checkpoint


def load_trained_tokenizer(run_dir: str | Path, preset: TrainPreset) -> DCHT:
    """The tokenizer of a tokenizer run."""
    ckpt = load_checkpoint(Path(run_dir))
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no tokenizer checkpoint")
    tok = DCHT(preset.pipeline.tokenizer)
    tok.load_state_dict(ckpt["model"])
    return tok.eval()


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
