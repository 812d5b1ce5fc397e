"""Procedural scenes: determinism, truthful captions, the template grammar, and the dataset stream."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dcar.training.captions import caption, describe, parse_caption
from dcar.training.dataset import SceneDataset, collate_scenes, load_eval_split, write_eval_split
from dcar.training.render import render
from dcar.training.scenes import (
    BACKGROUNDS,
    COLORS,
    GAP,
    MARGIN,
    Description,
    Phrase,
    position_holds,
    relation_holds,
    sample_scene,
)


def _draw(seed: int, size: int = 64):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    return scene, caption(scene, rng), np.asarray(render(scene, size))


def test_same_seed_same_scene_caption_and_pixels():
    for seed in range(5):
        a, b = _draw(seed), _draw(seed)
        assert a[0] == b[0] and a[1] == b[1]
        np.testing.assert_array_equal(a[2], b[2])
    scenes = [_draw(seed) for seed in range(20)]
    assert len({repr(s) for s, _, _ in scenes}) == 20
    assert len({c for _, c, _ in scenes}) > 10


def test_captions_are_true_of_their_scenes():
    rng = np.random.default_rng(123)
    kinds = set()
    for _ in range(500):
        scene = sample_scene(rng)
        d = scene.description
        kinds.add(d.kind)
        objs = scene.objects
        assert len(objs) == sum(p.count for p in d.phrases)
        for o in objs:
            assert MARGIN - 1e-9 <= o.x - o.extent / 2 and o.x + o.extent / 2 <= 1 - MARGIN + 1e-9
            assert MARGIN - 1e-9 <= o.y - o.extent / 2 and o.y + o.extent / 2 <= 1 - MARGIN + 1e-9
            assert (0.15 <= o.extent <= 0.22) if o.size == "small" else (0.30 <= o.extent <= 0.45)
        for a, b in itertools.combinations(objs, 2):
            reach = (a.extent + b.extent) / 2 + GAP - 1e-9
            assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach
        if d.position:
            assert position_holds(d.position, objs[0].x, objs[0].y)
        if d.relation:
            assert relation_holds(objs[0], objs[1], d.relation, gap=GAP - 1e-9)
        text = caption(scene, rng)
        said = parse_caption(text)
        assert said.relation == d.relation and said.position == d.position
        assert [(p.shape, p.color, p.count) for p in said.phrases] == [
            (p.shape, p.color, p.count) for p in d.phrases
        ]
        assert all(s.size in (None, p.size) for s, p in zip(said.phrases, d.phrases, strict=True))
        assert said.background in (None, d.background)
    assert kinds == {"single", "pair", "count", "triple"}


def test_caption_grammar_round_trips_and_rejects_out_of_vocabulary():
    examples = [
        "a red circle on the left",
        "two blue squares",
        "a yellow triangle above a purple square on a gray background",
        "a large green circle in the top right corner",
        "an orange square, a white circle and a black triangle",
        "a gradient from pink to mint with one small red circle at the bottom",
    ]
    for text in examples:
        assert describe(parse_caption(text)) == text
    assert parse_caption("two blue squares").phrases == (Phrase("square", "blue", 2),)
    bad_captions = (
        "a red hexagon",
        "an red circle",
        "two blue square",
        "a blue circle on a red background",
        "five green circles",
        "a red circle and a blue square on the left",
    )
    for bad in bad_captions:
        with pytest.raises(ValueError):
            parse_caption(bad)
    with pytest.raises(ValueError):
        Description((Phrase("circle", "red", 2),), relation="above")


def test_background_palette_is_far_from_object_colours():
    objects = np.array(list(COLORS.values()), float)
    t = np.linspace(0, 1, 11)[:, None]
    for a, b in itertools.product(BACKGROUNDS.values(), repeat=2):
        mix = (1 - t) * np.array(a, float) + t * np.array(b, float)
        assert np.linalg.norm(mix[:, None] - objects[None], axis=-1).min() > 90


def test_render_keeps_exact_colours_inside_shapes():
    scene = sample_scene(np.random.default_rng(7))
    pixels = np.asarray(render(scene, 128))
    assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
    for o in scene.objects:
        # A point a little below the centre lies inside a triangle as well as a circle or square.
        row, col = int((o.y + 0.2 * o.extent) * 128), int(o.x * 128)
        assert tuple(pixels[row, col]) == COLORS[o.color]


def test_eval_split_round_trip(tmp_path):
    path = write_eval_split(tmp_path / "split", n=6, size=32, seed=3)
    assert path.name == "scenes.jsonl" and len(list(path.parent.glob("*.png"))) == 6
    samples = load_eval_split(path.parent)
    rng_again = write_eval_split(tmp_path / "again", n=6, size=32, seed=3)
    assert rng_again.read_text() == path.read_text()
    assert len(samples) == 6
    for s in samples:
        assert s.image.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(s.image), np.asarray(render(s.scene, 32)))
        assert parse_caption(s.caption).phrases[0].shape == s.scene.objects[0].shape


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_dataset_streams_per_rank_and_worker():
    ds = SceneDataset(size=32, seed=11)
    image, text, scene = next(iter(ds))
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()
    assert isinstance(text, str) and scene.objects

    def captions(rank, worker):
        return [t for _, t, _ in _take(ds.stream(rank, worker), 8)]

    assert captions(0, 0) == captions(0, 0)
    assert captions(0, 0) != captions(0, 1)
    assert captions(0, 0) != captions(1, 0)
    assert captions(0, 1) != captions(1, 0)
    assert captions(0, 0) != [t for _, t, _ in _take(SceneDataset(size=32, seed=12).stream(0, 0), 8)]


def test_dataloader_workers_draw_distinct_streams():
    ds = SceneDataset(size=32, seed=5, rank=1)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_scenes)
    batches = list(itertools.islice(iter(loader), 2))  # one batch from each worker, round-robin
    images, texts, scenes = batches[0]
    assert images.shape == (2, 3, 32, 32) and len(texts) == len(scenes) == 2
    for worker, (_, worker_texts, _) in enumerate(batches):
        assert worker_texts == [t for _, t, _ in _take(ds.stream(1, worker), 2)]
    assert batches[0][1] != batches[1][1]
