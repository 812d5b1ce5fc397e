"""Sampling sweeps: the grid is parsed and checked up front, every point reaches the sampler, one row each."""

import json

import numpy as np
import pytest

from dcar.cli.main import main as dcar
from dcar.model.knobs import KnobError
from dcar.training.render import render
from dcar.training.shapes_eval import EVAL_PROMPTS, scene_for_prompt
from dcar.training.sweep import format_sweep, parse_sweep, run_sweep


def test_grid_is_the_product_of_checked_values():
    grid = parse_sweep(["guidance-scale=1,3", "use_residuals=true,false", "guidance_decay=linear"])
    assert grid == [
        {"guidance_scale": 1.0, "use_residuals": True, "guidance_decay": "linear"},
        {"guidance_scale": 1.0, "use_residuals": False, "guidance_decay": "linear"},
        {"guidance_scale": 3.0, "use_residuals": True, "guidance_decay": "linear"},
        {"guidance_scale": 3.0, "use_residuals": False, "guidance_decay": "linear"},
    ]
    assert parse_sweep(["steps=4,8"]) == [{"steps": 4}, {"steps": 8}]
    for bad, words in [
        (["guidance_scale"], "KNOB=V1,V2"),
        (["temperature=1"], "unknown knob 'temperature'"),
        (["steps=4.5"], "steps must be an integer, got '4.5'"),
        (["use_residuals=maybe"], "use_residuals must be true or false, got 'maybe'"),
        (["steps=4", "steps=8"], "given twice"),
        (["guidance_scale=x"], "guidance_scale must be a number, got 'x'"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_sweep(bad)
    with pytest.raises(KnobError, match="randomize_temperature must be between 0 and 10"):
        parse_sweep(["randomize_temperature=0,11"])


class _RecordingPipe:
    """Draws every prompt right and records the knobs each image was asked with."""

    def __init__(self):
        self.calls = []
        self.by_prompt = {p.prompt: p for p in EVAL_PROMPTS}

    def params(self, prompt, seed, height, width, **knobs):
        self.calls.append(knobs)
        return (prompt, seed, height)

    def generate(self, params):
        class R:
            def __init__(self, image):
                self.image = image

        import torch

        out = []
        for prompt, seed, size in params:
            img = render(scene_for_prompt(self.by_prompt[prompt], np.random.default_rng(seed)), size)
            out.append(R(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255))
        return out


def test_every_grid_point_reaches_the_sampler():
    pipe = _RecordingPipe()
    prompts = EVAL_PROMPTS[:3]
    grid = parse_sweep(["guidance_scale=1,3", "steps=6", "use_residuals=false"])
    rows = run_sweep(pipe, grid, prompts, size=128, steps=12, seeds=(0, 1))
    assert [r["knobs"] for r in rows] == grid
    assert len(pipe.calls) == 2 * 3 * 2
    assert {(c["guidance_scale"], c["steps"], c["use_residuals"]) for c in pipe.calls} == {
        (1.0, 6, False),
        (3.0, 6, False),
    }
    assert all(r["shapes_eval"]["overall"] == 1.0 for r in rows)  # renders of the prompts pass
    table = format_sweep(rows)
    assert table.splitlines()[0].startswith("| guidance_scale | steps | use_residuals | single object |")
    assert "| 1.0 | 6 | false | 1.000 | **1.000** | 0/6 | 0 |" in table


def test_dcar_eval_sweep_on_tuning_prompts(ci_weights, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    args = ["eval", str(ci_weights), "--size", "128", "--seeds", "0", "--json", str(out)]
    assert dcar([*args, "--sweep", "guidance_scale=0,2"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["prompts"] == "tuning"  # sweeps choose defaults on held-out prompts unless told otherwise
    assert [r["knobs"] for r in result["sweep"]] == [{"guidance_scale": 0.0}, {"guidance_scale": 2.0}]
    texts = {p["prompt"] for p in result["sweep"][0]["shapes_eval"]["prompts"]}
    assert not texts & {p.prompt for p in EVAL_PROMPTS}
    assert "| 0.0 |" in table and "| 2.0 |" in table
    # a bad grid is refused before the model loads: one line naming the knob and its limit, exit 2
    assert dcar([*args, "--sweep", "guidance_scale=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guidance_scale" in err[0] and "at least 0" in err[0]
    assert dcar([*args, "--sweep", "steps=4", "--write-card"]) == 2
