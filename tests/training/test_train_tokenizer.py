"""Tokenizer training: each stage learns, a resumed run repeats the uninterrupted one, stage 3 freezes the
encoder and codebook, and the data stream matches SceneDataset."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace

import torch

from dcar.training.dataset import SceneDataset
from dcar.training.runlog import load_checkpoint
from dcar.training.streams import SceneCrops
from dcar.training.train_tokenizer import TokenizerTrainer, train_tokenizer
from tests.training.conftest import SINGLE, ci_options


def _rows(path):
    return list(csv.DictReader(path.open()))


def test_each_stage_reduces_its_loss(tmp_path, ci_preset):
    """A few steps on one fixed batch: every stage's reconstruction loss falls below its first value."""
    preset = replace(ci_preset, tokenizer=replace(ci_preset.tokenizer, disc_start=1.0, lr=3e-3))
    trainer = TokenizerTrainer(preset, tmp_path, SINGLE, ci_options())
    batch = trainer.data.next_batch(preset.tokenizer.batch)
    trainer.data.next_batch = lambda n: batch.clone()
    for stage in range(3):
        trainer.stage, trainer.step = stage, 0
        trainer.opt = trainer._make_optimizer(stage)
        model = trainer._wrap()
        losses = []
        for _ in range(8):
            row = trainer._train_step(model)
            losses.append(row["l1"] + row["l2"])
            trainer.step += 1
        assert losses[-1] < losses[0], (stage + 1, losses)


def test_resume_repeats_the_uninterrupted_run(tmp_path, ci_preset):
    """Stopping with a checkpoint (in stage 2, then in stage 3 with the GAN on) and resuming gives the same
    losses, step for step, as a run that never stopped."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_tokenizer(ci_preset, straight, SINGLE, ci_options())
    for stop in (6, 11):
        assert train_tokenizer(ci_preset, broken, SINGLE, ci_options(stop_at=stop)) == {"stopped_at": stop}
    train_tokenizer(ci_preset, broken, SINGLE, ci_options())
    a, b = _rows(straight / "losses.csv"), _rows(broken / "losses.csv")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 13)]
    for ra, rb in zip(a, b):
        ra.pop("sec"), rb.pop("sec")
        assert ra == rb
    assert any(r["g_loss"] for r in b), "the GAN phase never ran"
    assert (broken / "done").is_file()


def test_stage3_freezes_encoder_and_codebook(tmp_path, ci_preset):
    run = tmp_path / "run"
    train_tokenizer(ci_preset, run, SINGLE, ci_options(stop_at=8))  # stages 1-2 done, stage 3 not begun
    before = load_checkpoint(run)
    assert (before["stage"], before["step"]) == (2, 0)
    train_tokenizer(ci_preset, run, SINGLE, ci_options())
    after = load_checkpoint(run)["model"]
    for key, value in before["model"].items():
        if key.startswith(("encoder.", "quantize.")):
            assert torch.equal(value, after[key]), key
    changed = [
        k for k, v in before["model"].items() if k.startswith("decoder.") and not torch.equal(v, after[k])
    ]
    assert len(changed) > 10


def test_stage2_starts_from_encoder_latents(tmp_path, ci_preset):
    """The codebook is re-seeded from normalised latents when stage 2 begins (not left uniform +-1/N)."""
    run = tmp_path / "run"
    train_tokenizer(ci_preset, run, SINGLE, ci_options(stop_at=4))
    train_tokenizer(ci_preset, run, SINGLE, ci_options(stop_at=5))
    codebook = load_checkpoint(run)["model"]["quantize.embedding.weight"]
    assert torch.allclose(codebook.norm(dim=1), torch.ones(len(codebook)), atol=0.05)


def test_crops_follow_the_dataset_scenes_and_resume():
    crops = SceneCrops(seed=3, rank=0, render_size=64, crop=64, crops_per_image=1)
    ds = SceneDataset(size=64, seed=3, rank=0)
    images = [img for img, _, _ in (x for _, x in zip(range(3), iter(ds)))]
    assert torch.equal(crops.next_batch(3), torch.stack(images))
    state = crops.state()
    nxt = crops.next_batch(2)
    crops.load_state(state)
    assert torch.equal(crops.next_batch(2), nxt)


def test_scenes_drawn_ahead_by_worker_processes_give_the_same_batches_and_resume(tmp_path, ci_preset):
    serial = SceneCrops(seed=3, rank=0, render_size=64, crop=32, crops_per_image=2)
    ahead = SceneCrops(seed=3, rank=0, render_size=64, crop=32, crops_per_image=2, workers=2)
    try:
        for n in (5, 3):
            assert torch.equal(ahead.next_batch(n), serial.next_batch(n))
        state = ahead.state()  # the consumed position, not the one drawn ahead
        expected = serial.next_batch(4)
        ahead.next_batch(7)
        ahead.load_state(state)
        assert torch.equal(ahead.next_batch(4), expected)
    finally:
        ahead.close()
    # through the trainer: --draw-workers changes nothing but who draws
    runs = {w: tmp_path / f"w{w}" for w in (0, 2)}
    for workers, run in runs.items():
        train_tokenizer(ci_preset, run, SINGLE, ci_options(stop_at=3, draw_workers=workers))
    a, b = _rows(runs[0] / "losses.csv"), _rows(runs[2] / "losses.csv")
    assert len(a) == 3 and [{**r, "sec": 0} for r in a] == [{**r, "sec": 0} for r in b]


def test_sample_grid_and_val_log(tmp_path, ci_preset):
    run = tmp_path / "run"
    train_tokenizer(ci_preset, run, SINGLE, ci_options())
    grids = sorted((run / "samples").glob("tokenizer-*.png"))
    assert [g.name for g in grids] == ["tokenizer-000004.png", "tokenizer-000008.png", "tokenizer-000012.png"]
    val = _rows(run / "val.csv")
    assert [r["stage"] for r in val] == ["1", "2", "3"]
    shutil.rmtree(run)
