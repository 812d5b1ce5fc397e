"""Build the small official-config models of the golden set and load their state dicts strictly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dcar.model.config import GeneratorConfig, TokenizerConfig
from dcar.model.loading import load_strict
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer


def golden_tokenizer(golden: Path) -> DCHT:
    cfg = json.loads((golden / "tokenizer_config.json").read_text())
    model = DCHT(TokenizerConfig.from_official(cfg["dcht_config"], cfg["dc_ae"]))
    path = golden / "tokenizer_state_dict.safetensors"
    return load_strict(model, load_file(str(path)), path).eval()


def golden_generator(golden: Path) -> DCARTransformer:
    cfg = GeneratorConfig.from_official(json.loads((golden / "generator_config.json").read_text()))
    path = golden / "generator_state_dict.safetensors"
    return load_strict(DCARTransformer(cfg), load_file(str(path)), path).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
