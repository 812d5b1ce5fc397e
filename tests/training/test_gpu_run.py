"""The bounded GPU run, at toy size on the CPU: it trains, packs into parts a GPU host can return, and the
parts rebuild a weights directory that loads, keeps the source's token ids and records where it trained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from dcar.cli.main import main as dcar
from dcar.model.pipeline import Pipeline
from dcar.training import gpu_run as gpu
from dcar.training.export import export
from dcar.training.gpu_run import PART_BYTES, GpuRunConfig, pack, scaled_recipe, steps_for, unpack
from dcar.training.model_card import write_card
from dcar.training.pretokenize import load_pretokenized, pretokenize
from dcar.training.runlog import read_csv
from dcar.training.train_tokenizer import train_tokenizer
from dcar.training.trained import load_trained_tokenizer
from tests.training.conftest import SINGLE, ci_options

# What the GPU host's Python lacks (its package list): the run must not import them.
NOT_ON_THE_GPU_HOST = ("pydantic", "pydantic_settings", "fastapi", "uvicorn", "starlette", "multipart")


def test_steps_fill_the_time_left_with_room_to_spare():
    assert steps_for(100.0, 0.1) == 909  # 100 s / (1.1 x 0.1 s)
    assert steps_for(1000.0, 0.1) == 9000  # many: whole hundreds
    assert steps_for(1000.0, 0.1, max_steps=300) == 300
    assert steps_for(0.01, 0.1) == steps_for(-5.0, 0.1) == 1  # the budget already spent: one step


def test_tokenizer_stages_scale_together_to_the_time_left():
    from dcar.training.presets import TokenizerRecipe

    r = TokenizerRecipe(stage_steps=(1500, 3500, 2500), warmup=100, restart_every=100)
    # 1500 x 0.1 + 3500 x 0.1 + 2500 x 0.2 = 1000 s; 1100 s with 10% to spare is the recipe as it is
    assert scaled_recipe(r, (0.1, 0.1, 0.2), 1100.0) == r
    fast = scaled_recipe(r, (0.1, 0.1, 0.2), 2200.0)  # a fast host: twice the steps, the same warm-up
    assert fast.stage_steps == (3000, 7000, 5000) and (fast.warmup, fast.restart_every) == (100, 100)
    slow = scaled_recipe(r, (0.1, 0.1, 0.2), 110.0)  # a tenth: the warm-up and the restarts shrink alike
    assert slow.stage_steps == (150, 350, 250) and (slow.warmup, slow.restart_every) == (10, 10)
    refine = TokenizerRecipe(stage_steps=(0, 0, 600))
    assert scaled_recipe(refine, (0.0, 0.0, 0.5), 33.0).stage_steps == (0, 0, 60)  # a skipped stage stays so
    assert scaled_recipe(r, (0.1, 0.1, 0.1), -3.0).stage_steps == (1, 1, 1)  # no time left: a step each


def test_a_tokenizer_run_stops_at_its_deadline_with_a_checkpoint(tmp_path, ci_preset):
    import time
    from dataclasses import replace

    summary = train_tokenizer(ci_preset, tmp_path, SINGLE, replace(ci_options(), stop_by=time.monotonic()))
    assert summary == {"stopped_at": 0} and (tmp_path / "checkpoint.pt").is_file()
    assert not (tmp_path / "done").exists()  # rerunning resumes it


@pytest.fixture(scope="module")
def gpu_run_out(tmp_path_factory, ci_weights):
    """``dcar train gpu-run`` on the ci model, in a process where the server's packages cannot load."""
    root = tmp_path_factory.mktemp("gpu-run")
    argv = ["train", "gpu-run", "--preset", "ci", "--weights", str(ci_weights), "--out", str(root / "OUT"),
            "--work", str(root / "work"), "--scenes", "16", "--batch", "4", "--probe-steps", "3",
            "--max-steps", "5", "--reserve-s", "0", "--draw-workers", "2", "--device", "cpu",
            "--threads", "1"]  # fmt: skip
    code = (
        "import sys\n"
        f"for m in {NOT_ON_THE_GPU_HOST!r}: sys.modules[m] = None\n"
        "from dcar.cli.main import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc.stdout


def test_gpu_run_packs_parts_a_gpu_host_can_return(gpu_run_out):
    root, stdout = gpu_run_out
    out = root / "OUT"
    files = sorted(p.name for p in out.iterdir())
    assert files[:2] == ["report.json", "report.md"] and files[2:] and len(files) <= 8
    assert all(gpu.PART_NAME.fullmatch(name) for name in files[2:])
    assert all((out / f).stat().st_size <= PART_BYTES for f in files)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished" and report["steps"] == report["steps_done"] == 5
    assert report["images_seen"] == 20 and report["summary"]["steps"] == 5
    assert 0 < report["pretokenize_seconds"] < report["phases_seconds"]["pre-tokenizing and probe"]
    assert report["probe_step_seconds"] > 0 and set(report["phases_seconds"]) >= {"training", "export"}
    assert report["last_losses"]["ce"] > 0 and report["parts"] == files[2:]
    assert (
        "trained 5 steps (20 images)" in stdout and stdout.strip() == (out / "report.md").read_text().strip()
    )


def test_scenes_drawn_by_worker_processes_are_the_serial_ones(gpu_run_out, ci_preset, ci_weights, tmp_path):
    root, _ = gpu_run_out
    tok = load_trained_tokenizer(ci_weights, ci_preset)  # a weights directory's tokenizer
    tok = tok.to(memory_format=torch.channels_last)  # as the generator run holds it (other conv kernels)
    pretokenize(tok, tmp_path, 16, 128, 8, seed=0, d=SINGLE, show_progress=False, workers=0)
    parallel, serial = load_pretokenized(root / "work" / "tokens"), load_pretokenized(tmp_path)
    assert torch.equal(parallel[0], serial[0]) and torch.equal(parallel[1], serial[1])
    assert parallel[2] == serial[2]


def test_unpacked_weights_load_keep_the_token_ids_and_say_where_they_trained(
    gpu_run_out, ci_weights, ci_preset, tmp_path, capsys
):
    root, _ = gpu_run_out
    w = tmp_path / "w"
    shutil.copytree(ci_weights, w)
    (w / "eval.json").write_text("{}")  # an evaluated model: its card files move to previous/
    (w / "README.md").write_text("old card")
    assert dcar(["train", "gpu-unpack", str(root / "OUT"), "--out", str(w)]) == 0
    assert (w / "previous" / "README.md").read_text() == "old card" and not (w / "eval.json").exists()
    assert (w / "gpu-run" / "losses.csv").is_file() and (w / "gpu-run" / "report.md").is_file()

    new, old = (Pipeline.from_pretrained(p, dtype=torch.float32) for p in (w, ci_weights))
    for a, b in zip(new.tokenizer.state_dict().values(), old.tokenizer.state_dict().values()):
        assert torch.equal(a, b)  # the source's encoder and codebook: the same ids
    assert any(
        not torch.equal(a, b)
        for a, b in zip(new.generator.state_dict().values(), old.generator.state_dict().values())
    )
    image = new.generate([new.params("a red circle", seed=0, steps=2, residual_steps=2)])[0].image
    assert torch.isfinite(image).all()

    record = json.loads((w / "training.json").read_text())
    assert record["tokenizer_from"]["weights"] == str(ci_weights.resolve())
    old_record = json.loads((ci_weights / "training.json").read_text())
    assert record["tokenizer_seconds"] == old_record["tokenizer_seconds"]
    assert record["generator_seconds"] > 0 and record["pretokenize_seconds"] > 0
    card = write_card(w, {"size": 256, "steps": 12, "seeds": [0]}).read_text()
    hardware = next(line for line in card.splitlines() if line.startswith("- Hardware:"))
    assert f"the tokenizer comes from {ci_weights.name}, trained on" in hardware
    # a model whose tokenizer came from another names the one that trained it, not the middle one
    again = export(ci_preset, w, w, tmp_path / "again")
    assert json.loads((again / "training.json").read_text())["tokenizer_from"] == record["tokenizer_from"]

    assert dcar(["train", "gpu-unpack", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no parts (run-<checksum>.tar.NN-of-MM)" in err[0]


def test_parts_rejoin_in_order_and_a_missing_or_foreign_one_is_refused(tmp_path, ci_weights, monkeypatch):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "losses.csv").write_text("step,loss\n1,2.0\n")
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "run-0123456789abcdef.tar.00-of-01").write_text("a part of an earlier run")
    monkeypatch.setattr(gpu, "PART_BYTES", 2**20)  # the ci weights then take several parts
    parts = pack(ci_weights, run, out)
    assert len(parts) > 2 and all(p.stat().st_size <= 2**20 for p in parts)
    assert sorted(out.glob("run-*")) == parts  # the earlier run's part is gone
    w = unpack(out, tmp_path / "w")
    for f in ci_weights.rglob("*"):
        if f.is_file():
            assert (w / f.relative_to(ci_weights)).read_bytes() == f.read_bytes()
    assert (w / "gpu-run" / "losses.csv").read_text() == "step,loss\n1,2.0\n"

    def refused(words):
        with pytest.raises(ValueError, match=words):
            unpack(out, tmp_path / "w2")
        assert not (tmp_path / "w2").exists() and not list(tmp_path.glob(".w2-*"))  # nothing half-written

    data = parts[1].read_bytes()
    parts[1].write_bytes(data[:-10])  # cut on the way
    refused("checksum differs")
    parts[1].unlink()  # did not come back
    refused(f"part\\(s\\) 1 of {len(parts)} missing")
    parts[1].write_bytes(data)
    (out / "run-0123456789abcdef.tar.00-of-01").write_text("another run's")
    refused("parts of 2 different runs")
    (out / "run-0123456789abcdef.tar.00-of-01").unlink()

    monkeypatch.setattr(gpu, "MAX_PARTS", 2)
    with pytest.raises(ValueError, match="more than 2 parts of 1 MiB"):
        pack(ci_weights, run, out)


def test_a_member_outside_the_folder_is_refused(tmp_path):
    import hashlib
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "p").mkdir()
    digest = hashlib.sha256(buf.getvalue()).hexdigest()[:16]
    (tmp_path / "p" / f"run-{digest}.tar.00-of-01").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="refusing the packed run's member '../escape.txt'"):
        unpack(tmp_path / "p", tmp_path / "w")
    assert not (tmp_path / "escape.txt").exists()


def test_the_deadline_stops_training_and_the_report_says_so(tmp_path, ci_preset, ci_weights):
    cfg = GpuRunConfig(weights=ci_weights, minutes=0.001, scenes=8, batch=2, probe_steps=1, reserve_s=0)
    report = gpu.gpu_run(ci_preset, cfg, tmp_path / "work", tmp_path / "OUT", SINGLE)
    assert report["steps"] == 1 and report["steps_done"] == 0  # the budget was gone after the probe
    assert report["status"] == "stopped by the deadline at step 0 of 1"
    assert "stopped by the deadline" in (tmp_path / "OUT" / "report.md").read_text()
    assert list((tmp_path / "OUT").glob("run-*.tar.00-of-01"))  # what there is still comes back


def test_gpu_run_trains_its_own_tokenizer_first_when_asked(tmp_path, ci_preset, ci_weights):
    cfg = GpuRunConfig(weights=ci_weights, minutes=5, tokenizer_minutes=0.2, scenes=8, batch=2, probe_steps=2,
                       max_steps=3, reserve_s=0)  # fmt: skip
    report = gpu.gpu_run(ci_preset, cfg, tmp_path / "work", tmp_path / "OUT", SINGLE)
    tok = report["tokenizer"]
    assert all(s > 0 for s in tok["probe_stage_seconds"]) and len(tok["stage_steps"]) == 3
    # 12 s hold far more than the probe's 6 steps of ~0.05 s; on a slow host: as many steps as it took
    if tok["status"] == "finished":
        assert tok["steps_done"] == sum(tok["stage_steps"]) > 3 * cfg.probe_steps
        used = tok["stage_steps"]
    elif tok["status"].startswith("stopped by the deadline at step"):  # past stage 1: used as it stands
        assert tok["stage_steps"][0] < tok["steps_done"] < sum(tok["stage_steps"])
        used = tok["stage_steps"]
    else:  # the probe ran all three stages and is the tokenizer
        assert "the probe is the tokenizer" in tok["status"] and tok["steps_done"] == 3 * cfg.probe_steps
        used = [cfg.probe_steps] * 3
    assert {"tokenizer probe", "training"} <= set(report["phases_seconds"])
    assert report["status"] == "finished" and report["steps_done"] == 3
    md = (tmp_path / "OUT" / "report.md").read_text()
    assert "- tokenizer trained here;" in md and "s a step in stages 1 / 2 / 3 -> stage steps" in md

    w = unpack(tmp_path / "OUT", tmp_path / "w")
    logged = read_csv(w / "gpu-run" / "tokenizer" / "losses.csv")
    assert len(logged) == tok["steps_done"] and logged[0]["stage"] == 1
    new, old = (Pipeline.from_pretrained(p, dtype=torch.float32) for p in (w, ci_weights))
    assert not torch.equal(
        new.tokenizer.quantize.embedding.weight, old.tokenizer.quantize.embedding.weight
    )  # its own codebook, not the one of --weights
    record = json.loads((w / "training.json").read_text())
    assert "tokenizer_from" not in record and record["tokenizer_seconds"] > 0
    assert record["preset"]["tokenizer"]["stage_steps"] == used  # the steps that ran, not the preset's
    image = new.generate([new.params("a red circle", seed=0, steps=2, residual_steps=2)])[0].image
    assert torch.isfinite(image).all()


def test_a_tokenizer_the_deadline_stops_past_stage_1_is_used_as_it_stands(
    tmp_path, ci_preset, ci_weights, monkeypatch
):
    """The generator trainer refused it (no 'done' file), so a slow host's run failed after its tokenizer."""
    from dataclasses import replace

    # a schedule far longer than 12 s: the deadline stops it in stage 2, past the seeded codebook
    monkeypatch.setattr(
        gpu, "scaled_recipe", lambda recipe, *_: replace(recipe, stage_steps=(2, 10**6, 10**6))
    )
    cfg = GpuRunConfig(weights=ci_weights, minutes=5, tokenizer_minutes=0.2, scenes=8, batch=2, probe_steps=2,
                       max_steps=3, reserve_s=0)  # fmt: skip
    report = gpu.gpu_run(ci_preset, cfg, tmp_path / "work", tmp_path / "OUT", SINGLE)
    tok = report["tokenizer"]
    assert tok["status"] == f"stopped by the deadline at step {tok['steps_done']}" and tok["steps_done"] > 2
    assert report["status"] == "finished" and report["steps_done"] == 3
    record = json.loads((unpack(tmp_path / "OUT", tmp_path / "w") / "training.json").read_text())
    assert record["tokenizer_seconds"] > 0


def test_a_tokenizer_probe_the_deadline_stops_is_refused(tmp_path, ci_preset, ci_weights):
    cfg = GpuRunConfig(
        weights=ci_weights, minutes=5, tokenizer_minutes=1e-4, scenes=8, batch=2, probe_steps=2
    )
    with pytest.raises(
        ValueError, match=r"the tokenizer's probe \(2 steps a stage\) did not finish within it"
    ):
        gpu.gpu_run(ci_preset, cfg, tmp_path / "work", tmp_path / "OUT", SINGLE)


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--minutes", "0"], "--minutes must be positive, got 0.0"),
        (["--tokenizer-minutes", "-1"], "--tokenizer-minutes must be at least 0, got -1.0"),
        (
            ["--tokenizer-minutes", "1", "--weights", "w"],
            "--weights names a tokenizer to use, --tokenizer-minutes",
        ),
        (["--tokenizer-minutes", "7.5"], "--tokenizer-minutes 7.5 leaves under a minute of --minutes 8"),
        (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        (["--reserve-s", "-1"], "--reserve-s must be at least 0, got -1.0"),
        (["--weights", "nowhere"], "nowhere: neither a finished tokenizer run"),
    ],
)
def test_gpu_run_refuses_bad_options_in_one_line(extra, words, tmp_path, capsys):
    argv = ["train", "gpu-run", "--out", str(tmp_path / "OUT"), "--work", str(tmp_path / "w"), "--preset", "ci",
            "--device", "cpu", "--draw-workers", "0", *extra]  # fmt: skip
    assert dcar(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_gpu_run_refuses_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dcar(["train", "gpu-run", "--out", str(tmp_path / "OUT")]) == 2
    assert "one process" in capsys.readouterr().err


def test_both_trainers_run_under_bf16_autocast_as_on_a_gpu(tmp_path, ci_preset):
    """A GPU run trains in bf16 (``default_precision``), which this suite's fp32 runs never exercise: a dtype
    mismatch would end the lent minutes in a traceback. CPU autocast takes bf16 on any x86 CPU."""
    import math

    from dcar.training.train_generator import train_generator

    opts = ci_options(precision="bf16")
    assert (
        train_tokenizer(ci_preset, tmp_path / "tok", SINGLE, opts)["steps"] == ci_preset.tokenizer.total_steps
    )
    summary = train_generator(ci_preset, tmp_path / "tok", tmp_path / "data", tmp_path / "gen", SINGLE, opts)
    assert summary["steps"] == ci_preset.generator.steps and summary["vae_scale"] > 0
    for run in ("tok", "gen"):
        rows = read_csv(tmp_path / run / "losses.csv")
        assert rows and all(math.isfinite(r["loss"]) for r in rows), run
