"""Training presets: v1 (`tiny-shapes`) keeps the recipe of the committed weights and is what
`make train-tiny` runs; v2 (`tiny-shapes-v2`) refines a trained decoder and continues a trained generator, changes
nothing else, fits the weights budget and trains resumably."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import torch

from dcar.model.text_encoder import TextEncoder
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer
from dcar.training.presets import CI, TINY_SHAPES, TINY_SHAPES_V2, train_preset
from dcar.training.train_tokenizer import train_tokenizer
from tests.training.conftest import SINGLE, ci_options

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "weights" / "dcar-tiny-shapes" / "training.json"


def _plain(x):
    return json.loads(json.dumps(x))


def test_v1_recipe_is_still_the_committed_weights_recipe():
    record = json.loads(COMMITTED.read_text())
    # v2 re-exported v1's generator with a refined tokenizer: v1's recipe is the base's
    committed = record["base"]["preset"] if "base" in record else record["preset"]
    assert committed["name"] == "tiny-shapes"
    now = _plain(TINY_SHAPES.to_dict())
    for part in ("tokenizer", "generator"):
        for key, value in committed[part].items():
            assert now[part][key] == value, (part, key)
    assert TINY_SHAPES.tokenizer.ceiling_seeds == ()  # v1 training does not measure (nor slow down)


def test_v2_refines_v1s_decoder_and_changes_nothing_else():
    v1, v2 = TINY_SHAPES, TINY_SHAPES_V2
    assert train_preset("tiny-shapes-v2") is v2
    assert v2.pipeline == v1.pipeline  # same architecture, codebook and sampling defaults
    # the generator: a further, shorter schedule at a lower peak lr on v1's generator; nothing else changes
    g = v2.generator
    assert g.further and g.needs_init and g.steps < v1.generator.steps and g.lr < v1.generator.lr
    assert replace(g, steps=v1.generator.steps, lr=v1.generator.lr, further=False) == v1.generator
    t = v2.tokenizer
    assert t.stage_steps[:2] == (0, 0) and t.stage_steps[2] > 0  # stage 3 only: decoder trained
    assert t.crop == t.render_size == 256 and t.crops_per_image == 1  # whole scenes, not 128 px crops
    assert t.outline_weight > 0 and t.lr < v1.tokenizer.lr and t.ceiling_seeds
    # the continuous path only: trained on bare codewords too, the decoder stopped profiting from the
    # head's sampled residuals (docs/training.md, variant A)
    assert t.continuous_prob == 1.0


def test_v2_weights_fit_the_40_mb_budget():
    p = TINY_SHAPES_V2.pipeline
    n = sum(
        sum(x.numel() for x in m.parameters())
        for m in (DCHT(p.tokenizer), DCARTransformer(p.generator), TextEncoder.from_config(p.text_encoder))
    )
    assert n * 4 <= 40e6, n  # stored float32


def _rows(path):
    return [{k: v for k, v in r.items() if k != "sec"} for r in csv.DictReader(path.open())]


def test_v2_recipe_at_toy_size_resumes_step_for_step(tmp_path):
    toy = replace(
        CI,
        name="ci-v2",
        tokenizer=replace(
            TINY_SHAPES_V2.tokenizer,
            render_size=64,
            crop=64,
            batch=2,
            stage_steps=(2, 3, 3),
            warmup=1,
            restart_every=2,
            disc_start=0.5,
            val_images=1,
            ceiling_seeds=(0,),
        ),
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # the reference run skips the stage-end ceilings (half of this test's time): they only read the model,
    # so the two runs must still agree bit for bit
    without_ceilings = replace(toy, tokenizer=replace(toy.tokenizer, ceiling_seeds=()))
    train_tokenizer(without_ceilings, straight, SINGLE, ci_options())
    for stop in (1, 4, 7):  # inside each stage
        assert train_tokenizer(toy, broken, SINGLE, ci_options(stop_at=stop)) == {"stopped_at": stop}
    train_tokenizer(toy, broken, SINGLE, ci_options())
    assert _rows(straight / "losses.csv") == _rows(broken / "losses.csv")
    assert len(_rows(broken / "losses.csv")) == 8
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(broken / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for stage in (1, 2, 3):
        assert (broken / f"ceiling-stage{stage}.json").is_file()


def _make_n(target: str, *variables: str) -> tuple[list[str], list[list[str]]]:
    """The ``dcar train``/``dcar eval`` commands ``make -n target`` would run, and their kinds."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", target, *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    commands = [shlex.split(line) for line in out.splitlines() if " train " in line or " eval " in line]
    return [c[c.index("train") + 1] if "train" in c else "eval" for c in commands], commands


def _arg(c: list[str], flag: str) -> str:
    return c[c.index(flag) + 1]


def test_make_train_tiny_reproduces_the_committed_weights_recipe():
    kinds, commands = _make_n("train-tiny")
    assert kinds == ["tokenizer", "generator", "export", "eval"]
    tok, gen, export = commands[:3]
    record = json.loads(COMMITTED.read_text())["preset"]["name"]
    assert all(_arg(c, "--preset") == record == "tiny-shapes" for c in (tok, gen, export))
    assert _arg(gen, "--tokenizer") == _arg(export, "--tokenizer") == _arg(tok, "--out")
    assert _arg(export, "--generator") == _arg(gen, "--out")
    assert _arg(export, "--out") == "weights/dcar-tiny-shapes"
    assert _arg(export, "--name") == "dcar-tiny-shapes"


def test_make_train_tiny_skips_finished_runs_and_a_card_newer_than_them(tmp_path):
    """A rerun of a finished recipe started the export and the ~11 min evaluation again, which also moved
    the committed card to previous/; each step now runs only when what it reads is newer than its output."""
    runs, weights = tmp_path / "runs", tmp_path / "weights"
    variables = (f"TINY_RUNS={runs}", f"TINY_WEIGHTS={weights}")

    def planned() -> list[str]:
        return _make_n("train-tiny", *variables)[0]

    def finish(path: Path, when: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        os.utime(path, (when, when))

    assert planned() == ["tokenizer", "generator", "export", "eval"]
    finish(runs / "tokenizer" / "done", 1_000)
    assert planned() == ["generator", "export", "eval"]
    finish(runs / "generator" / "done", 2_000)
    assert planned() == ["export", "eval"]
    finish(weights / "eval.json", 3_000)
    assert planned() == []  # finished and evaluated: nothing to do
    finish(runs / "generator" / "done", 4_000)  # the generator was trained again (--fresh)
    assert planned() == ["export", "eval"]


def test_make_train_tiny_v2_continues_v1s_runs_and_leaves_the_committed_weights():
    kinds, commands = _make_n("train-tiny-v2")
    assert kinds == ["tokenizer", "generator", "tokenizer", "generator", "export", "eval"]
    tok1, gen1, tok2, gen2, export, ev = commands
    assert [_arg(c, "--preset") for c in commands[:5]] == ["tiny-shapes"] * 2 + ["tiny-shapes-v2"] * 3
    assert (tok1, gen1) == tuple(_make_n("train-tiny")[1][:2])  # the same v1 runs: done once, shared
    assert _arg(tok2, "--init-from") == _arg(tok1, "--out") and _arg(gen2, "--init-from") == _arg(
        gen1, "--out"
    )
    assert _arg(gen2, "--tokenizer") == _arg(export, "--tokenizer") == _arg(tok2, "--out")
    assert _arg(export, "--generator") == _arg(gen2, "--out")
    # new scenes: another seed than v1's (0) into another dataset directory
    assert (
        "--seed" not in gen1
        and int(_arg(gen2, "--seed")) != 0
        and _arg(gen2, "--data") != _arg(gen1, "--data")
    )
    assert _arg(export, "--out") != "weights/dcar-tiny-shapes" and ev[ev.index("eval") + 1] == _arg(
        export, "--out"
    )
