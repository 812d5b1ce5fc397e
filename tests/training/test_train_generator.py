"""Generator training: masking and loss definitions, caption variants, the pre-tokenized stream, learning on a
fixed batch, and resume = uninterrupted."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcar.training.captions import parse_caption
from dcar.training.losses import arccos_mask, masked_token_loss
from dcar.training.pretokenize import load_pretokenized
from dcar.training.runlog import load_checkpoint
from dcar.training.scenes import sample_scene
from dcar.training.streams import TokenData, caption_variant
from dcar.training.train_generator import GeneratorTrainer, _Step, train_generator
from tests.training.conftest import SINGLE, ci_options


def test_arccos_mask_distribution():
    g = torch.Generator().manual_seed(0)
    m = arccos_mask(20000, 64, g)
    counts = m.sum(1).float()
    assert counts.min() >= 1 and counts.max() <= 64
    # ratio density (pi/2) sin(pi x / 2): mean 2/pi; P(ratio <= 1/2) = 1 - cos(pi/4)
    assert abs(counts.mean().item() / 64 - 2 / math.pi) < 0.01
    assert abs((counts <= 32).float().mean().item() - (1 - math.cos(math.pi / 4))) < 0.015
    # positions are uniform
    assert (m.float().mean(0) - m.float().mean()).abs().max() < 0.02


def test_masked_token_loss_weights_unmasked_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    masked = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    loss, parts = masked_token_loss(logits, targets, masked, label_smoothing=0.1, unmasked_weight=0.1)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", label_smoothing=0.1)
    w = masked.flatten().float() * 0.9 + 0.1
    assert torch.allclose(loss, (ce * w).sum() / w.sum())
    assert math.isclose(parts["ce_masked"], ce[masked.flatten()].mean().item(), rel_tol=1e-5)


def test_caption_variants_stay_true_to_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        d = scene.description
        for _ in range(3):
            text = caption_variant(scene, rng)
            parsed = parse_caption(text)  # raises on anything outside the templates
            assert sorted((p.shape, p.color, p.count) for p in parsed.phrases) == sorted(
                (p.shape, p.color, p.count) for p in d.phrases
            )
            first = (parsed.phrases[0].shape, parsed.phrases[0].color)
            if d.relation is not None and first != (d.phrases[0].shape, d.phrases[0].color):
                mirror = {
                    "above": "below",
                    "below": "above",
                    "to the left of": "to the right of",
                    "to the right of": "to the left of",
                }
                assert parsed.relation == mirror[d.relation]


def test_token_stream_splits_ranks_and_resumes():
    n = 10
    tokens = torch.arange(n).view(n, 1)
    res = torch.zeros(n, 1, 2)
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(n)]
    a, b = (TokenData(tokens, res, scenes, seed=0, rank=r, world=2) for r in (0, 1))
    ia, ib = a.next_batch(5)[0].flatten().tolist(), b.next_batch(5)[0].flatten().tolist()
    assert sorted(ia + ib) == list(range(n))  # one epoch, split between the ranks
    state = a.state()
    nxt = a.next_batch(3)
    a.load_state(state)
    again = a.next_batch(3)
    assert torch.equal(nxt[0], again[0]) and nxt[2] == again[2]


def test_pretokenized_data_and_vae_scale(ci_weights, ci_data):
    ids, res, scenes, meta = load_pretokenized(ci_data)
    assert ids.shape == (16, 16) and res.shape == (16, 16, 32) and len(scenes) == 16
    assert meta["residual_std"] == pytest.approx(res.float().std().item(), rel=1e-4)
    cfg = json.loads((ci_weights / "generator" / "config.json").read_text())
    assert cfg["head"]["vae_scale"] == pytest.approx(meta["residual_std"], abs=1e-5)


def test_pretokenizing_resumed_in_another_session_counts_every_shards_time(
    tmp_path, ci_preset, ci_tokenizer_run
):
    from dcar.training.pretokenize import pretokenize
    from dcar.training.trained import load_trained_tokenizer

    tok = load_trained_tokenizer(ci_tokenizer_run, ci_preset)

    def run():
        return pretokenize(tok, tmp_path, 6, 64, 2, seed=0, d=SINGLE, show_progress=False)

    def shard_seconds():
        return [torch.load(p, weights_only=False)["seconds"] for p in sorted(tmp_path.glob("shard-*.pt"))]

    whole = run()
    first = shard_seconds()
    assert len(first) == 3 and min(first) > 0 and whole["seconds"] == pytest.approx(sum(first))
    ids = load_pretokenized(tmp_path)[0]
    # a session that ended after the first shard: the next one encodes the other two and counts all three
    for name in ("meta.json", "shard-00001.pt", "shard-00002.pt"):
        (tmp_path / name).unlink()
    resumed = run()
    again = shard_seconds()
    assert again[0] == first[0]  # kept, not encoded again
    assert resumed["seconds"] == pytest.approx(sum(again))  # this session's two shards and the first
    assert torch.equal(load_pretokenized(tmp_path)[0], ids)
    # a shard written before shards kept their time: the total is unknown, not too small
    old = torch.load(tmp_path / "shard-00000.pt", weights_only=False)
    del old["seconds"]
    torch.save(old, tmp_path / "shard-00000.pt")
    (tmp_path / "meta.json").unlink()
    assert run()["seconds"] is None


def test_a_few_steps_reduce_the_loss(tmp_path, ci_preset, ci_tokenizer_run, ci_data):
    """On one fixed batch (and fixed masks), both the CE and the diffusion loss fall from their first value."""
    trainer = GeneratorTrainer(ci_preset, ci_tokenizer_run, ci_data, tmp_path, SINGLE, ci_options())
    batch = trainer.data.next_batch(8)
    trainer.data.next_batch = lambda n: batch
    state = trainer.cpu_gen.get_state()
    ce, diff = [], []
    for step in range(12):
        trainer.cpu_gen.set_state(state)  # the same masks and text dropout every step
        trainer.dev_gen.manual_seed(0)  # the same diffusion timesteps and noise every step
        trainer.step = step + 5  # past the warm-up
        row = trainer._train_step(_Step(trainer.gen, trainer.text))
        ce.append(row["ce"])
        diff.append(row["diffusion"])
    assert ce[-1] < ce[0] - 0.1, ce
    assert diff[-1] < diff[0], diff


def test_resume_repeats_the_uninterrupted_run(tmp_path, ci_preset, ci_tokenizer_run, ci_data):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_generator(ci_preset, ci_tokenizer_run, ci_data, straight, SINGLE, ci_options())
    assert train_generator(ci_preset, ci_tokenizer_run, ci_data, broken, SINGLE, ci_options(stop_at=3)) == {
        "stopped_at": 3
    }
    train_generator(ci_preset, ci_tokenizer_run, ci_data, broken, SINGLE, ci_options())
    a = list(csv.DictReader((straight / "losses.csv").open()))
    b = list(csv.DictReader((broken / "losses.csv").open()))
    assert len(a) == len(b) == ci_preset.generator.steps
    for ra, rb in zip(a, b):
        ra.pop("sec"), rb.pop("sec")
        assert ra == rb
    ca, cb = load_checkpoint(straight), load_checkpoint(broken)
    for key in ("generator", "ema_generator", "text"):
        for k, v in ca[key].items():
            assert torch.equal(v, cb[key][k]), (key, k)
    assert (broken / "samples" / "generator-000008.png").is_file()
