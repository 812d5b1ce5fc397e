"""The tokenizer ceiling (training/ceiling.py, ``dcar eval --tokenizer-ceiling``, the stage-end files)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dcar.cli.main import main as dcar
from dcar.model.config import TINY_HT
from dcar.model.tokenizer import DCHT
from dcar.training.ceiling import PATHS, ceiling_images, format_ceiling, tokenizer_ceiling
from dcar.training.shapes_eval import CATEGORIES, EVAL_PROMPTS
from dcar.training.train_tokenizer import train_tokenizer
from tests.training.conftest import SINGLE, ci_options


@pytest.fixture(scope="module")
def untrained() -> DCHT:
    torch.manual_seed(0)
    return DCHT(TINY_HT).eval()


def test_truth_scores_one_and_an_untrained_tokenizer_scores_far_lower(untrained):
    result = tokenizer_ceiling(untrained, size=128, seeds=(0,))
    assert result["num_images"] == len(EVAL_PROMPTS)
    assert set(result["paths"]) == set(PATHS)
    truth = result["paths"]["truth"]
    assert truth["overall"] == 1.0 and set(truth["categories"].values()) == {1.0}
    for path in ("continuous", "hybrid", "discrete"):
        assert result["paths"][path]["overall"] < 0.5, (path, result["paths"][path])
    table = format_ceiling(result)
    assert table.count("\n| ") == len(PATHS) + 1 and "| truth | 1.000 |" in table
    assert all(c.replace("_", " ") in table.splitlines()[0] for c in CATEGORIES)


def test_the_paths_decode_different_inputs(untrained):
    specs = EVAL_PROMPTS[:3]
    images = ceiling_images(untrained, specs, [0, 0, 0], 128, [0, 1, 2])
    arr = {p: np.stack([np.asarray(im, np.float32) for im in ims]) for p, ims in images.items()}
    assert all(a.shape == (3, 128, 128, 3) for a in arr.values())
    # codewords alone differ from the continuous latent; codewords + float16 residuals are the latent again
    assert np.abs(arr["discrete"] - arr["continuous"]).mean() > 1.0
    assert np.abs(arr["hybrid"] - arr["continuous"]).max() <= 2.0
    assert np.abs(arr["truth"] - arr["continuous"]).mean() > 1.0  # an untrained decoder draws no scene
    # scenes are drawn per (seed, prompt index): another seed gives another scene of the same prompt
    other = ceiling_images(untrained, specs[:1], [1], 128, [0])["truth"][0]
    assert not np.array_equal(np.asarray(other), arr["truth"][0].astype(np.uint8))


def test_measuring_leaves_the_training_mode_alone(untrained):
    untrained.train()
    try:
        tokenizer_ceiling(untrained, size=64, seeds=(0,), prompts=EVAL_PROMPTS[:2])
        assert all(m.training for m in untrained.modules())
    finally:
        untrained.eval()


def test_eval_command_on_a_run_and_merged_into_the_card(ci_tokenizer_run, ci_weights, tmp_path):
    out = tmp_path / "run.json"
    assert (
        dcar(
            [
                "eval",
                str(ci_tokenizer_run),
                "--tokenizer-ceiling",
                "--size",
                "128",
                "--seeds",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads(out.read_text())
    assert run["source"].startswith("stage 3") and run["paths"]["truth"]["overall"] == 1.0
    # a tokenizer run has no model card
    assert dcar(["eval", str(ci_tokenizer_run), "--tokenizer-ceiling", "--write-card"]) == 2

    (ci_weights / "eval.json").write_text(json.dumps({"card_notes": ["History: a note kept."], "size": 128}))
    assert (
        dcar(
            ["eval", str(ci_weights), "--tokenizer-ceiling", "--size", "128", "--seeds", "0", "--write-card"]
        )
        == 0
    )
    merged = json.loads((ci_weights / "eval.json").read_text())
    assert merged["card_notes"] == ["History: a note kept."] and merged["size"] == 128
    # the same tokenizer weights, the same scenes: the same numbers as from the run directory
    assert merged["tokenizer_ceiling"]["paths"] == run["paths"]
    card = (ci_weights / "README.md").read_text()
    assert "## Tokenizer ceiling" in card and "- History: a note kept." in card
    assert format_ceiling(merged["tokenizer_ceiling"]) in card
    assert "tokenizer ceiling, truth path" not in card  # the targets are defined at 256 px


def test_stage_ends_write_the_ceiling(tmp_path, ci_preset):
    preset = replace(ci_preset, tokenizer=replace(ci_preset.tokenizer, render_size=128, ceiling_seeds=(0,)))
    train_tokenizer(preset, tmp_path, SINGLE, ci_options())
    steps = np.cumsum(preset.tokenizer.stage_steps)
    for stage in (1, 2, 3):
        result = json.loads((tmp_path / f"ceiling-stage{stage}.json").read_text())
        assert (result["stage"], result["step"], result["size"]) == (stage, steps[stage - 1], 128)
        assert result["paths"]["truth"]["overall"] == 1.0
