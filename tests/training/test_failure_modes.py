"""Failure modes: each kind of wrong image gets its own fault, from live detections and from eval.json text."""

import json

import numpy as np
import pytest
from PIL import Image

from dcar.training.failure_modes import FAULTS, failure_counts, faults, format_failures
from dcar.training.render import render
from dcar.training.shapes_eval import Detection, PromptSpec, detect, run_shapes_eval, scene_for_prompt

# (prompt's category, prompt, what the image shows instead, the one fault expected)
WRONG_IMAGES = [
    ("single_object", "a blue square", "a blue circle", "shape"),
    ("colors", "a yellow triangle", "a purple triangle", "own colour lost"),
    ("position", "a red circle to the left of a blue square", "a blue circle to the left of a blue square",
     "colour bound wrong"),
    ("position", "a red circle to the left of a blue square", "a red circle to the right of a blue square",
     "relation"),
    ("counting", "two red circles", "three red circles", "count"),
    ("single_object", "a red circle", "a red circle and a green square", "stray"),
    ("single_object", "a large blue triangle", "a small blue triangle", "size"),
]  # fmt: skip


def _render(text: str, seed: int = 3, size: int = 256) -> Image.Image:
    category = (
        "position" if " of " in text or " above " in text else "two_object" if " and " in text else "colors"
    )
    spec = PromptSpec.from_text(category, text)
    return render(scene_for_prompt(spec, np.random.default_rng(seed)), size)


@pytest.mark.parametrize(("category", "prompt", "shown", "fault"), WRONG_IMAGES)
def test_each_wrong_image_gets_its_fault(category, prompt, shown, fault):
    spec = PromptSpec.from_text(category, prompt)
    assert faults(detect(_render(shown)), spec) == [fault]
    assert faults(detect(_render(prompt)), spec) == []  # the right image has none


def test_a_blank_image_misses_every_object():
    blank = Image.new("RGB", (128, 128), (128, 128, 128))
    assert faults(detect(blank), PromptSpec.from_text("two_object", "a red circle and a blue square")) == [
        "missing"
    ]


def test_detections_round_trip_through_their_text():
    dets = detect(_render("a green triangle above a purple square"))
    assert len(dets) == 2
    for d in dets:
        back = Detection.parse(str(d))
        assert str(back) == str(d) and (back.shape, back.color, back.size) == (d.shape, d.color, d.size)
    with pytest.raises(ValueError, match="not a detection"):
        Detection.parse("a big red blob")


def test_counts_and_table_from_a_run_and_from_its_json():
    prompts = [PromptSpec.from_text(c, p) for c, p, _, _ in WRONG_IMAGES[:2]]
    shown = {p: s for _, p, s, _ in WRONG_IMAGES[:2]}

    def generate(texts, seeds):  # seed 0 draws the right image, seed 1 the wrong one
        return [
            _render(t if s == 0 else shown[t], seed=s + 3, size=128)
            for t, s in zip(texts, seeds, strict=True)
        ]

    results = run_shapes_eval(generate, size=128, seeds=(0, 1), prompts=prompts)
    assert [r["passed"] for r in results["prompts"]] == [[True, False], [True, False]]
    # eval.json keeps the detections as text: the counts read back from it are the same
    for r in (results, json.loads(json.dumps(results))):
        counts = failure_counts(r)
        assert counts["categories"] == ["single_object", "colors"]
        assert counts["images"] == {"single_object": 2, "colors": 2}
        assert counts["failed"] == {"single_object": 1, "colors": 1}
        assert {f: n for f, n in counts["faults"].items() if any(n.values())} == {
            "shape": {"single_object": 1, "colors": 0},
            "own colour lost": {"single_object": 0, "colors": 1},
        }
        assert counts["objects_asked"] == {"circle": 0, "square": 2, "triangle": 2}
        assert counts["drawn_as"]["square"] == {"circle": 1, "square": 0, "triangle": 0}
        assert not any(counts["drawn_as"]["triangle"].values())  # recoloured, not reshaped
    table = format_failures(results)
    assert "| **failed images** | 1/2 | 1/2 | **2/4** |" in table
    assert "| shape | 1 | 0 | **1** |" in table and "| own colour lost | 0 | 1 | **1** |" in table
    assert "| relation |" not in table  # a fault no image shows gets no row
    assert "| square | 2 | 1 | - | 0 |" in table and "| triangle | 2 | 0 | 0 | - |" in table
    assert "| circle |" not in table  # no circle was asked for
    assert FAULTS["shape"] in table


def test_dcar_eval_explain_reads_stored_results(tmp_path, capsys):
    from dcar.cli.main import main as dcar

    prompts = [{"category": "single_object", "prompt": "a blue square", "passed": [False, True],
                "detections": [["large blue circle at (0.50, 0.50)"], ["large blue square at (0.40, 0.50)"]]}]  # fmt: skip
    shapes = {"categories": {"single_object": 0.5}, "overall": 0.5, "size": 256, "seeds": [0, 1],
              "num_images": 2, "prompts": prompts}  # fmt: skip
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "eval.json").write_text(json.dumps({"shapes_eval": shapes}))
    (tmp_path / "results.json").write_text(json.dumps({"shapes_eval": shapes}))
    for target in (weights, tmp_path / "results.json"):  # a weights directory or a --json file
        assert dcar(["eval", str(target), "--explain"]) == 0
        out = capsys.readouterr().out
        assert "| **overall** | **0.500** |" in out and "| **failed images** | 1/2 | **1/2** |" in out
        assert "| shape | 1 | **1** |" in out and "| square | 2 | 1 | - | 0 |" in out
    # nothing to explain: one line naming the file, exit 2
    (weights / "eval.json").write_text(json.dumps({"tokenizer_ceiling": {}}))
    assert dcar(["eval", str(weights), "--explain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.json" in err[0] and "ShapesEval" in err[0]
    assert dcar(["eval", str(tmp_path / "none"), "--explain"]) == 2
    assert "no results to explain" in capsys.readouterr().err
    # a measurement asked for beside --explain is refused, not silently skipped
    for extra in (["--sweep", "steps=8"], ["--tokenizer-ceiling"], ["--write-card"], ["--json", "r.json"]):
        assert dcar(["eval", str(tmp_path / "results.json"), "--explain", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"--explain measures nothing; it cannot be combined with {extra[0]}"]
