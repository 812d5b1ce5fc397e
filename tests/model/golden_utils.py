"""Build the small official-config models of the golden set, load their state dicts strictly, and read the
set's own description (seeds, guidance, step counts, call recipes) from its JSON files.

Nothing about one particular golden set is written in the tests: sizes come from the models built from
``*_config.json`` or from the tensors' shapes, recipes from ``*_golden.json`` (see tests/golden/README.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from dcar.model.config import GeneratorConfig, TokenizerConfig
from dcar.model.loading import load_strict
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer


def read_json(golden: Path, name: str) -> dict:
    return json.loads((golden / name).read_text())


def golden_tokenizer(golden: Path) -> DCHT:
    cfg = read_json(golden, "tokenizer_config.json")
    model = DCHT(TokenizerConfig.from_official(cfg["dcht_config"], cfg["dc_ae"]))
    path = golden / "tokenizer_state_dict.safetensors"
    return load_strict(model, load_file(str(path)), path).eval()


def golden_generator(golden: Path) -> DCARTransformer:
    cfg = GeneratorConfig.from_official(read_json(golden, "generator_config.json"))
    path = golden / "generator_state_dict.safetensors"
    return load_strict(DCARTransformer(cfg), load_file(str(path)), path).eval()


@dataclass(frozen=True)
class HeadSampleCall:
    """One recorded ``torch.manual_seed(seed); diffloss.sample(z..., cfg=scale)`` of ``generator_golden``."""

    tag: str  # the tensor-name suffix, e.g. ``diffsample.out.<tag>``
    seed: int
    cfg: float


def head_sample_calls(meta: dict) -> list[HeadSampleCall]:
    """The diffusion-head sampling calls the golden set recorded, parsed from their recipe strings."""
    calls = []
    for tag, recipe in meta["diffsample_calls"].items():
        seed = re.search(r"manual_seed\((\d+)\)", recipe)
        cfg = re.search(r"cfg=([0-9.]+)", recipe)
        assert seed and cfg, f"unreadable diffsample recipe {tag}: {recipe}"
        calls.append(HeadSampleCall(tag, int(seed.group(1)), float(cfg.group(1))))
    return calls


def cfg_tag(scale: float) -> str:
    """How tensor names spell a guidance scale (``net_cfg4.5``)."""
    return f"cfg{scale:g}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()
