"""``dcar train`` as a user runs it: bad flag values end in one line with status 2, a rerun with other
flags than the run (or its pre-tokenized data) was started with is refused rather than mixed into it, a
finished run is skipped only when asked for as it was trained, and Ctrl-C stops at a step with a
checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from dcar.cli.main import main
from dcar.training.train_tokenizer import TokenizerTrainer

FAST = ["--preset", "ci", "--no-progress", "--threads", "1", "--precision", "fp32"]


def dcar(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's refusals
        return int(e.code)


def swap(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or the flag added)."""
    if flag not in argv:
        return [*argv, flag, value]
    i = argv.index(flag) + 1
    return [*argv[:i], value, *argv[i + 1 :]]


def one_line_refusal(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()  # what earlier commands wrote
    code = dcar(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    assert err.startswith(f"dcar train {argv[1]}: error: "), err
    assert all(w in err for w in words), (words, err)
    return err


def _steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader((run / "losses.csv").open())]


def _bad_values(tmp: Path, tok: Path) -> list[tuple[list[str], str]]:
    (tmp / "a-file").write_text("")
    file = str(tmp / "a-file")
    out = ["--out", str(tmp / "o")]
    gen = ["train", "generator", *FAST, "--tokenizer", str(tok), "--data", str(tmp / "d"), *out]
    export = ["train", "export", "--preset", "ci", "--tokenizer", str(tok), "--generator", str(tok)]
    cases = [
        (["train", "tokenizer", "--preset", "nope", *out], "--preset: unknown training preset 'nope'"),
        (["train", "tokenizer", *FAST, "--out", file], "--out: "),
        (["train", "tokenizer", *FAST, "--out", file + "/run"], "--out: "),
        (["train", "tokenizer", *FAST, *out, "--stage-steps", "1,2"], "--stage-steps: must be three"),
        (["train", "tokenizer", *FAST, *out, "--batch", "0"], "--batch: must be at least 1"),
        (["train", "tokenizer", *FAST, *out, "--crop", "50"], "--crop: 50 px"),
        (["train", "tokenizer", *FAST, *out, "--lr", "-1"], "--lr: must be above 0"),
        (["train", "tokenizer", *out, "--threads", "-1"], "--threads: must be at least 1"),
        (["train", "tokenizer", *FAST, *out, "--init-from", str(tmp / "nothing")], "--init-from: "),
        ([*gen, "--steps", "-5"], "--steps: must be at least 1"),
        ([*gen, "--num-images", "0"], "--num-images: must be at least 1"),
        (swap(gen, "--data", file), "--data: "),
        (swap(gen, "--tokenizer", str(tmp / "nothing")), "--tokenizer: "),
        ([*export, "--out", file], "--out: "),
        ([*export, "--out", str(tmp / "w"), "--guidance-scale", "-5"], "--guidance-scale: "),
        (swap([*export, *out], "--preset", "nope"), "--preset: "),
        (swap([*export, *out], "--tokenizer", str(tmp / "nothing")), "--tokenizer: "),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["train", "tokenizer", *FAST, *out, "--device", "cuda"], "--device: "))
    return cases


def test_bad_flag_values_end_in_one_line(tmp_path, capsys, ci_tokenizer_run):
    """Each once ended in a traceback (status 1) or, for --steps -5, in a run marked done that never
    trained; now one line naming the flag, status 2, and nothing written."""
    for argv, words in _bad_values(tmp_path, ci_tokenizer_run):
        one_line_refusal(capsys, argv, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_resumed_or_finished_tokenizer_run_refuses_other_flags(tmp_path, capsys):
    """A rerun with other stage steps once resumed the checkpoint inside another schedule (stage 2 after
    one step of stage 1), and a finished run was skipped whatever the flags said."""
    run = ["train", "tokenizer", *FAST, "--stage-steps", "1,1,1", "--out", str(tmp_path / "t")]
    assert dcar([*run, "--stop-at", "1"]) == 0
    ckpt = (tmp_path / "t" / "checkpoint.pt").read_bytes()
    one_line_refusal(capsys, swap(run, "--stage-steps", "2,1,1"), "--out: ", "stage_steps 1,1,1")
    one_line_refusal(capsys, [*run, "--seed", "1"], "--out: ", "seed 0 (now 1)")
    assert (tmp_path / "t" / "checkpoint.pt").read_bytes() == ckpt  # untouched
    assert dcar(run) == 0 and _steps(tmp_path / "t") == [1, 2, 3]
    one_line_refusal(capsys, [*run, "--batch", "2"], "--out: ", "finished", "batch 4 (now 2)")
    assert dcar(run) == 0 and '"skipped": "done"' in capsys.readouterr().err
    assert dcar([*run, "--batch", "2", "--fresh"]) == 0 and _steps(tmp_path / "t") == [1, 2, 3]


@pytest.fixture(scope="module")
def stopped_generator(tmp_path_factory, ci_tokenizer_run) -> tuple[Path, list[str]]:
    """A ci generator run stopped at step 1 of 2 on 8 pre-tokenized scenes, and its command."""
    root = tmp_path_factory.mktemp("gen-cli")
    run = ["train", "generator", *FAST, "--tokenizer", str(ci_tokenizer_run), "--data", str(root / "d")]
    run += ["--num-images", "8", "--steps", "2", "--out", str(root / "g")]
    assert dcar([*run, "--stop-at", "1"]) == 0
    return root, run


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """A ci tokenizer of another seed: its ids mean other codewords."""
    out = tmp_path_factory.mktemp("other-tok")
    assert (
        dcar(["train", "tokenizer", *FAST, "--stage-steps", "1,1,0", "--seed", "1", "--out", str(out)]) == 0
    )
    return out


def test_a_resumed_generator_refuses_other_flags(stopped_generator, capsys):
    root, run = stopped_generator
    one_line_refusal(capsys, swap(run, "--steps", "3"), "--out: ", "steps 2 (now 3)")
    assert _steps(root / "g") == [1]


def test_pretokenized_data_of_other_scenes_or_ids_are_refused(stopped_generator, other_tokenizer, capsys):
    """Reusing a dataset with another --seed or --num-images, or another tokenizer, once trained silently on
    the old scenes or on ids of another codebook; an interrupted dataset (shards, no meta.json) was
    completed with shards of the new seed."""
    root, run = stopped_generator
    elsewhere = swap(run, "--out", str(root / "g2"))
    one_line_refusal(capsys, swap(elsewhere, "--seed", "1"), "--data: ", "seed 0 (this run: 1)")
    one_line_refusal(capsys, swap(elsewhere, "--num-images", "16"), "--data: ", "num_images 8 (this run: 16)")
    other = swap(elsewhere, "--tokenizer", str(other_tokenizer))
    one_line_refusal(capsys, other, "--data: ", "tokenizer (encoder and codebook digest)")
    partial = root / "partial"
    shutil.copytree(root / "d", partial)
    (partial / "meta.json").unlink()
    resumed = swap(swap(elsewhere, "--data", str(partial)), "--seed", "1")
    one_line_refusal(capsys, resumed, "--data: ", "plan.json", "seed 0 (this run: 1)")
    assert not (root / "g2").exists()


def test_export_refuses_a_tokenizer_whose_ids_the_generator_never_saw(
    stopped_generator, other_tokenizer, tmp_path, capsys
):
    root, _ = stopped_generator
    argv = ["train", "export", "--preset", "ci", "--tokenizer", str(other_tokenizer)]
    one_line_refusal(
        capsys, [*argv, "--generator", str(root / "g"), "--out", str(tmp_path / "w")], "codebook"
    )
    assert not (tmp_path / "w").exists()


def test_ctrl_c_stops_at_a_step_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    """Ctrl-C once raised KeyboardInterrupt mid-step (a traceback, and the steps since the last checkpoint
    lost); now the run stops before its next step, saves, says how to resume, and status 130."""
    step = TokenizerTrainer._train_step

    def interrupted_at_2(self, model):
        row = step(self, model)
        if self.global_step == 1:  # this is step 2
            os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(TokenizerTrainer, "_train_step", interrupted_at_2)
    # as in a terminal (a background job of a script starts with SIGINT ignored, which the run respects)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    run = ["train", "tokenizer", *FAST, "--stage-steps", "2,1,1", "--out", str(tmp_path / "t")]
    try:
        code = dcar(run)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the run with a KeyboardInterrupt")
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert code == 130 and "interrupted at step 2" in err and "Traceback" not in err, err
    ckpt = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=False)
    assert (ckpt["stage"], ckpt["step"]) == (1, 0)  # stage 1's two steps done
    assert _steps(tmp_path / "t") == [1, 2]
    monkeypatch.undo()
    assert dcar(run) == 0 and _steps(tmp_path / "t") == [1, 2, 3, 4]


def test_fresh_forgets_the_lineage_of_the_run_it_replaces(tmp_path, ci_tokenizer_run):
    """--fresh kept lineage.json, so a fresh run from another --init-from counted the old source's cost."""
    other = tmp_path / "copy"
    shutil.copytree(ci_tokenizer_run, other)
    run = ["train", "tokenizer", *FAST, "--stage-steps", "0,0,1", "--out", str(tmp_path / "r")]
    assert dcar([*run, "--init-from", str(ci_tokenizer_run), "--stop-at", "0"]) == 0
    assert dcar([*run, "--init-from", str(other), "--fresh"]) == 0
    lineage = json.loads((tmp_path / "r" / "lineage.json").read_text())
    assert lineage["source"] == str(other.resolve())
