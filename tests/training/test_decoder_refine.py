"""v2's tokenizer recipe: refine a trained tokenizer's decoder (``--init-from``, stages 1-2 skipped) with an
outline-weighted pixel loss, then re-export a weights directory with its generator kept, which is allowed
only while the token ids keep their meaning (encoder and codebook unchanged)."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcar.cli.main import main as dcar
from dcar.training.losses import outline_weights, reconstruction_loss
from dcar.training.presets import CI, TINY_SHAPES_V2
from dcar.training.train_tokenizer import train_tokenizer
from tests.training.conftest import SINGLE, ci_options


def _square(size: int = 32, lo: int = 10, hi: int = 22) -> torch.Tensor:
    """A white square on black, in [-1, 1], (1, 3, size, size)."""
    x = -torch.ones(1, 3, size, size)
    x[:, :, lo:hi, lo:hi] = 1.0
    return x


def test_outline_weights_mark_a_band_around_edges_only():
    w = outline_weights(_square(), weight=10.0, band=5)
    assert w.shape == (1, 1, 32, 32)
    assert set(w.unique().tolist()) == {1.0, 11.0}
    assert w[0, 0, 10, 16] == 11.0 and w[0, 0, 21, 16] == 11.0  # on the top and bottom edges
    assert w[0, 0, 16, 16] == 1.0  # the square's flat middle
    assert w[0, 0, 0, 0] == 1.0 and w[0, 0, 31, 31] == 1.0  # far background
    # band 5 reaches 2 px beyond the Sobel response (itself 1 px either side of the step)
    assert w[0, 0, 6, 16] == 1.0 and w[0, 0, 7, 16] == 11.0
    assert torch.equal(outline_weights(torch.zeros(2, 3, 16, 16), weight=10.0), torch.ones(2, 1, 16, 16))


def test_weighted_reconstruction_loss_is_a_weighted_mean():
    g = torch.Generator().manual_seed(0)
    x, rec = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    plain, parts = reconstruction_loss(rec, x)
    same, _ = reconstruction_loss(rec, x, pixel_weight=torch.full((2, 1, 8, 8), 3.0))
    assert torch.allclose(plain, same)
    w = torch.ones(2, 1, 8, 8)
    w[0, 0, 0, 0] = 101.0
    weighted, parts_w = reconstruction_loss(rec, x, l1=1.0, l2=0.0, pixel_weight=w)
    err = (rec - x).abs()
    expected = (err * w).sum() / (w.sum() * 3)
    assert torch.allclose(weighted, expected)
    assert parts_w == parts  # the logged terms stay unweighted, comparable across recipes


def test_v2_is_v1_plus_a_decoder_refinement():
    r = TINY_SHAPES_V2.tokenizer
    assert r.stage_steps[:2] == (0, 0) and r.stage_steps[2] > 0
    assert r.outline_weight > 0 and r.disc_weight == 0.0
    assert r.crop == r.render_size == 256 and r.ceiling_seeds


def _tensors(path):
    return torch.load(path / "checkpoint.pt", weights_only=False)["model"]


def test_refine_from_a_run_changes_only_the_decoder_and_resumes_step_for_step(
    tmp_path, ci_preset, ci_tokenizer_run
):
    preset = replace(
        ci_preset,
        tokenizer=replace(
            ci_preset.tokenizer,
            stage_steps=(0, 0, 4),
            init_from=str(ci_tokenizer_run),
            outline_weight=10.0,
            disc_weight=0.0,
            ceiling_seeds=(0,),
            render_size=128,
        ),
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_tokenizer(preset, straight, SINGLE, ci_options())
    # the interrupted run skips the stage-end ceiling (it only reads the model): the runs still agree
    quiet = replace(preset, tokenizer=replace(preset.tokenizer, ceiling_seeds=()))
    assert train_tokenizer(quiet, broken, SINGLE, ci_options(stop_at=2)) == {"stopped_at": 2}
    train_tokenizer(quiet, broken, SINGLE, ci_options())
    rows = [
        {k: v for k, v in r.items() if k != "sec"} for r in csv.DictReader((straight / "losses.csv").open())
    ]
    assert [r["stage"] for r in rows] == ["3"] * 4
    assert all(r["d_loss"] == "" for r in rows)  # no GAN at disc_weight 0
    again = [
        {k: v for k, v in r.items() if k != "sec"} for r in csv.DictReader((broken / "losses.csv").open())
    ]
    assert rows == again
    before, after = _tensors(ci_tokenizer_run), _tensors(straight)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder"}
    assert all(torch.equal(after[k], _tensors(broken)[k]) for k in after)
    # only the stage that ran measured its ceiling
    assert [p.name for p in straight.glob("ceiling-stage*.json")] == ["ceiling-stage3.json"]


def _refine(init, out) -> int:
    """``dcar train tokenizer``: a 3-step decoder refinement of the ci tokenizer in ``init``."""
    return dcar(
        ["train", "tokenizer", "--preset", "ci", "--stage-steps", "0,0,3", "--no-progress", "--threads", "1"]
        + ["--init-from", str(init), "--out", str(out)]
    )


def test_cli_refuses_a_refinement_without_init_from(tmp_path, capsys):
    code = dcar(
        ["train", "tokenizer", "--preset", "ci", "--stage-steps", "0,0,3", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--init-from" in err[0]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    # a directory that holds no tokenizer (here: an empty one) is named, in one line
    (tmp_path / "empty").mkdir()
    code = _refine(tmp_path / "empty", tmp_path / "r")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "neither a tokenizer run" in err[0] and "empty" in err[0], err


def test_a_further_generator_schedule_refuses_to_start_from_scratch(
    tmp_path, capsys, ci_preset, ci_tokenizer_run
):
    from dcar.training.train_generator import train_generator

    run = ["--tokenizer", str(tmp_path / "t"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "g")]
    assert dcar(["train", "generator", "--preset", "tiny-shapes-v2", *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "further schedule" in err[0] and "--init-from" in err[0], err
    assert not any(tmp_path.iterdir())  # refused before reading or writing anything
    further = replace(ci_preset, generator=replace(ci_preset.generator, further=True))
    with pytest.raises(ValueError, match="init_from"):  # the library refuses it too
        train_generator(further, ci_tokenizer_run, tmp_path / "d", tmp_path / "g", SINGLE, ci_options())
    assert not any(tmp_path.iterdir())  # nothing pre-tokenized either


def test_cli_refines_from_weights_and_reexports_them_keeping_the_generator(tmp_path, ci_weights, capsys):
    weights = tmp_path / "w"
    shutil.copytree(ci_weights, weights)
    (weights / "eval.json").write_text(json.dumps({"shapes_eval": {"overall": 0.25}}))
    (weights / "README.md").write_text("old card\n")
    run = tmp_path / "refined"
    assert _refine(weights, run) == 0
    old_gen = load_file(str(weights / "generator" / "model.safetensors"))
    old_tok = load_file(str(weights / "tokenizer" / "model.safetensors"))
    export = ["train", "export", "--preset", "ci", "--tokenizer", str(run), "--out", str(weights)]
    assert dcar([*export, "--generator", str(weights)]) == 0
    new_gen = load_file(str(weights / "generator" / "model.safetensors"))
    new_tok = load_file(str(weights / "tokenizer" / "model.safetensors"))
    assert all(torch.equal(old_gen[k], new_gen[k]) for k in old_gen)
    changed = {k.split(".")[0] for k in old_tok if not torch.equal(old_tok[k], new_tok[k])}
    assert changed == {"decoder"}
    record = json.loads((weights / "training.json").read_text())
    assert record["tokenizer_refine_seconds"] > 0 and record["base"]["name"] == "dcar-ci"
    # the replaced model's card files are kept for the old-vs-new card
    assert json.loads((weights / "previous" / "eval.json").read_text())["shapes_eval"]["overall"] == 0.25
    assert (weights / "previous" / "README.md").read_text() == "old card\n"
    assert not (weights / "eval.json").exists()
    capsys.readouterr()

    # a tokenizer with another encoder and codebook would silently change what the generator's ids mean
    other = tmp_path / "other"
    train_tokenizer(
        replace(CI, tokenizer=replace(CI.tokenizer, stage_steps=(2, 2, 0))), other, SINGLE, ci_options(seed=1)
    )
    assert (
        dcar(
            [
                *export[:4],
                "--tokenizer",
                str(other),
                "--out",
                str(tmp_path / "bad"),
                "--generator",
                str(weights),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder or codebook" in err[0]
    assert not (tmp_path / "bad").exists()


def _results(overall: float, seeds: list[int]) -> dict:
    cats = {
        c: overall for c in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    }
    ceiling_path = {"categories": cats, "overall": overall}
    return {
        "size": 256,
        "steps": 12,
        "seeds": seeds,
        "prompts": "shapes-eval",
        "guidance_scale": None,
        "shapes_eval": {
            "categories": cats,
            "overall": overall,
            "seeds": seeds,
            "num_images": 60 * len(seeds),
            "size": 256,
        },
        "tokenizer_ceiling": {
            "size": 256,
            "seeds": seeds,
            "num_images": 60 * len(seeds),
            "paths": {p: ceiling_path for p in ("truth", "continuous", "hybrid", "discrete")},
        },
    }


def test_card_compares_with_the_replaced_model_only_where_measured_alike(tmp_path, ci_weights):
    from dcar.training.model_card import write_card

    weights = tmp_path / "w"
    shutil.copytree(ci_weights, weights)
    (weights / "previous").mkdir()
    (weights / "previous" / "eval.json").write_text(json.dumps(_results(0.25, [0, 1, 2, 3])))
    (weights / "previous" / "samples.png").write_bytes(b"png")
    new = _results(0.5, [0, 1, 2, 3])
    # per-image results as eval.json keeps them: the previous model drew the square round, this one did not
    old_prompts = [{"category": "single_object", "prompt": "a blue square", "passed": [False],
                    "detections": [["large blue circle at (0.50, 0.50)"]]}]  # fmt: skip
    new_prompts = [
        {**old_prompts[0], "passed": [True], "detections": [["large blue square at (0.50, 0.50)"]]}
    ]
    old = _results(0.25, [0, 1, 2, 3])
    old["shapes_eval"]["prompts"], new["shapes_eval"]["prompts"] = old_prompts, new_prompts
    (weights / "previous" / "eval.json").write_text(json.dumps(old))
    card = write_card(weights, new).read_text()
    assert "| failed images | 1 | 0 | -1 |" in card and "| failed images, fault: shape | 1 | 0 | -1 |" in card
    assert "### Why images fail" in card and "| **failed images** | 0/1 | **0/1** |" in card
    (weights / "previous" / "eval.json").write_text(json.dumps(_results(0.25, [0, 1, 2, 3])))
    card = write_card(weights, _results(0.5, [0, 1, 2, 3])).read_text()
    assert "## This model vs the one it replaced" in card
    assert "| failed images |" not in card and "### Why images fail" not in card  # no per-image results
    assert "| **overall** | **0.250** | **0.500** | **+0.250** |" in card
    assert "| continuous | previous |" in card and "| discrete | this model |" in card
    assert "![previous samples](previous/samples.png)" in card
    # measured on other seeds: no side-by-side rows that would mix protocols
    card = write_card(weights, _results(0.5, [0, 1])).read_text()
    assert "**+0.250**" not in card and "| continuous | previous |" not in card
    (weights / "previous" / "eval.json").unlink()
    assert "vs the one it replaced" not in write_card(weights, _results(0.5, [0])).read_text()


def test_generator_continues_from_a_weights_directory_on_the_same_ids(
    tmp_path, ci_preset, ci_tokenizer_run, ci_data, ci_weights, capsys
):
    from dcar.training.train_generator import train_generator

    preset = replace(ci_preset, generator=replace(ci_preset.generator, init_from=str(ci_weights), steps=2))
    run = tmp_path / "g"
    assert train_generator(preset, ci_tokenizer_run, ci_data, run, SINGLE, ci_options(stop_at=0)) == {
        "stopped_at": 0
    }
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    shipped = load_file(str(ci_weights / "generator" / "model.safetensors"))
    for key in ("generator", "ema_generator"):  # live and EMA weights both start from the shipped ones
        assert all(torch.equal(ckpt[key][k], shipped[k]) for k in shipped), key
    shipped_cfg = json.loads((ci_weights / "generator" / "config.json").read_text())
    assert ckpt["generator_config"]["head"]["vae_scale"] == shipped_cfg["head"]["vae_scale"]
    # then it trains on: two steps move the weights
    train_generator(preset, ci_tokenizer_run, ci_data, run, SINGLE, ci_options())
    after = torch.load(run / "checkpoint.pt", weights_only=False)["generator"]
    assert any(not torch.equal(after[k], shipped[k]) for k in shipped)

    # a tokenizer whose ids mean other codewords is refused, in one line
    other = tmp_path / "other-tok"
    train_tokenizer(
        replace(CI, tokenizer=replace(CI.tokenizer, stage_steps=(2, 2, 0))), other, SINGLE, ci_options(seed=1)
    )
    capsys.readouterr()
    code = dcar(
        [
            "train",
            "generator",
            "--preset",
            "ci",
            "--tokenizer",
            str(other),
            "--no-progress",
            "--threads",
            "1",
            "--data",
            str(tmp_path / "d2"),
            "--out",
            str(tmp_path / "g2"),
            "--init-from",
            str(ci_weights),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "encoder or codebook" in err[0], err


def _seconds(run, name="done"):
    return json.loads((run / name).read_text())["seconds"]


def _record(weights):
    return json.loads((weights / "training.json").read_text())


def test_export_of_a_refined_further_lineage_counts_every_run_once(
    tmp_path, ci_preset, ci_tokenizer_run, ci_data, ci_generator_run
):
    from dcar.training.export import export
    from dcar.training.model_card import write_card
    from dcar.training.train_generator import train_generator

    refined = tmp_path / "refined"
    assert _refine(ci_tokenizer_run, refined) == 0
    gen = replace(ci_preset.generator, steps=2, init_from=str(ci_generator_run), further=True)
    further = replace(ci_preset, generator=gen)
    more = tmp_path / "more"  # new scenes (seed 1), as tiny-shapes-v2 draws them
    train_generator(further, refined, tmp_path / "tokens-2", more, SINGLE, ci_options(seed=1, stop_at=1))
    so_far = torch.load(more / "checkpoint.pt", weights_only=False)["elapsed"]
    record = _record(export(further, refined, more, tmp_path / "mid"))  # mid-run: the time so far
    assert record["generator_further_seconds"] == so_far > 0
    assert record["generator_seconds"] == pytest.approx(_seconds(ci_generator_run) + so_far)
    train_generator(further, refined, tmp_path / "tokens-2", more, SINGLE, ci_options(seed=1))
    record = _record(export(further, refined, more, tmp_path / "w"))
    assert record["tokenizer_refine_seconds"] == _seconds(refined)
    assert record["tokenizer_seconds"] == pytest.approx(_seconds(ci_tokenizer_run) + _seconds(refined))
    assert record["generator_further_seconds"] == _seconds(more)
    assert record["generator_seconds"] == pytest.approx(_seconds(ci_generator_run) + _seconds(more))
    meta = "data_meta.json"
    assert record["pretokenize_seconds"] == pytest.approx(
        _seconds(ci_generator_run, meta) + _seconds(more, meta)
    )
    assert len(record["datasets"]) == 2
    card = write_card(tmp_path / "w", _results(0.5, [0])).read_text()
    assert "(of which the further schedule" in card and "(of which the decoder refinement" in card

    # a further schedule on the same pre-tokenized scenes: their pre-tokenizing is counted once
    again = tmp_path / "again"
    train_generator(further, refined, ci_data, again, SINGLE, ci_options())
    record = _record(export(further, refined, again, tmp_path / "w2"))
    assert record["pretokenize_seconds"] == pytest.approx(_seconds(ci_generator_run, meta))


def test_lineage_from_weights_survives_re_export_over_them_and_other_directories(
    tmp_path, ci_preset, ci_tokenizer_run, ci_data, ci_weights, monkeypatch
):
    from dcar.training.export import export
    from dcar.training.train_generator import train_generator

    weights = tmp_path / "w"
    shutil.copytree(ci_weights, weights)
    v1 = _record(weights)
    monkeypatch.chdir(tmp_path)  # relative sources, as `make` passes them
    refined, more = Path("refined"), Path("more")
    assert _refine(Path("w"), refined) == 0
    gen = replace(ci_preset.generator, steps=2, init_from="w", further=True)
    further = replace(ci_preset, generator=gen)
    train_generator(further, refined, ci_data, more, SINGLE, ci_options())  # v1's scenes again

    def check(record):
        own_tok, own_gen = _seconds(tmp_path / refined), _seconds(tmp_path / more)
        assert record["tokenizer_seconds"] == pytest.approx(v1["tokenizer_seconds"] + own_tok)
        assert record["generator_seconds"] == pytest.approx(v1["generator_seconds"] + own_gen)
        assert record["pretokenize_seconds"] == pytest.approx(v1["pretokenize_seconds"])  # the same scenes

    for _ in range(2):  # over the source itself, twice: its training.json now holds the new totals
        check(_record(export(further, refined, more, weights)))
    monkeypatch.chdir(ci_data)  # elsewhere: the runs recorded absolute sources and their costs
    check(_record(export(further, tmp_path / refined, tmp_path / more, tmp_path / "w3")))

    # a run that recorded nothing (made before lineage.json) whose source is gone: unknown, not zero
    (tmp_path / refined / "lineage.json").unlink()
    record = _record(export(further, tmp_path / refined, tmp_path / more, tmp_path / "w4"))
    assert record["tokenizer_seconds"] is None and record["tokenizer_refine_seconds"] == _seconds(
        tmp_path / refined
    )
