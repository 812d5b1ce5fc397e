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
from dcar.training.gpu_run import PART_BYTES, steps_for
from dcar.training.model_card import write_card
from dcar.training.pretokenize import load_pretokenized, pretokenize
from dcar.training.trained import load_trained_tokenizer
from tests.training.conftest import SINGLE

# What the GPU host's Python lacks (its package list): the run must not import them.
NOT_ON_THE_GPU_HOST = ("pydantic", "pydantic_settings", "fastapi", "uvicorn", "starlette", "multipart")


def test_steps_fill_the_time_left_with_room_to_spare():
    assert steps_for(100.0, 0.1) == 952  # 100 s / (1.05 x 0.1 s)
    assert steps_for(1000.0, 0.1) == 9500  # many: whole hundreds
    assert steps_for(1000.0, 0.1, max_steps=300) == 300
    assert steps_for(0.01, 0.1) == steps_for(-5.0, 0.1) == 1  # the budget already spent: one step


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
    assert all(name.startswith("run.tar.") for name in files[2:])
    assert all((out / f).stat().st_size <= PART_BYTES for f in files)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 5 and report["images_seen"] == 20 and report["summary"]["steps"] == 5
    assert 0 < report["pretokenize_seconds"] < report["phases_seconds"]["pre-tokenizing and probe"]
    assert report["probe_step_seconds"] > 0 and set(report["phases_seconds"]) >= {"training", "export"}
    assert report["last_losses"]["ce"] > 0 and report["parts"] == files[2:]
    assert "5 steps (20 images)" in stdout and stdout.strip() == (out / "report.md").read_text().strip()


def test_scenes_drawn_by_worker_processes_are_the_serial_ones(gpu_run_out, ci_preset, ci_weights, tmp_path):
    root, _ = gpu_run_out
    tok = load_trained_tokenizer(ci_weights, ci_preset)  # a weights directory's tokenizer
    tok = tok.to(memory_format=torch.channels_last)  # as the generator run holds it (other conv kernels)
    pretokenize(tok, tmp_path, 16, 128, 8, seed=0, d=SINGLE, show_progress=False, workers=0)
    parallel, serial = load_pretokenized(root / "work" / "tokens"), load_pretokenized(tmp_path)
    assert torch.equal(parallel[0], serial[0]) and torch.equal(parallel[1], serial[1])
    assert parallel[2] == serial[2]


def test_unpacked_weights_load_keep_the_token_ids_and_say_where_they_trained(
    gpu_run_out, ci_weights, tmp_path, capsys
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

    assert dcar(["train", "gpu-unpack", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run.tar.* parts" in err[0]
