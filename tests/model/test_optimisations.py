"""Every optimisation keeps the outputs: tokens identical, pixels within 1e-4 of the plain path."""

from __future__ import annotations

import pytest
import torch

from dcar.model.batch import BATCH_BUCKETS, CAPTION_BUCKETS, bucket
from dcar.model.config import pipeline_preset
from dcar.model.pipeline import Pipeline
from dcar.model.sampler import BatchState, SamplerOptions

PLAIN = SamplerOptions(cache_text_kv=False, batch_cfg=False)


def _pipe(options: SamplerOptions) -> Pipeline:
    return Pipeline.from_config(pipeline_preset("tiny"), seed=0, options=options)


def _rows(pipe):
    return [
        pipe.params("a red circle on the left", seed=1),
        pipe.params("two blue squares", seed=2, guidance_scale=2.5, steps=8),
        pipe.params("x", seed=3, guidance_decay="linear"),
        pipe.params("a yellow triangle above a purple square", seed=4, randomize_temperature=0.7),
    ]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens)
        assert (x.image - y.image).abs().max() < 1e-4


@pytest.fixture(scope="module")
def plain_results():
    pipe = _pipe(PLAIN)
    return pipe.generate(_rows(pipe))


@pytest.mark.parametrize(
    "options",
    [
        SamplerOptions(),
        SamplerOptions(cache_text_kv=False),
        SamplerOptions(batch_cfg=False),
        SamplerOptions(channels_last_decoder=True),
    ],
    ids=["default", "no-kv-cache", "no-cfg-batch", "channels-last-decoder"],
)
def test_kv_cache_and_cfg_batching_keep_outputs(plain_results, options):
    pipe = _pipe(options)
    _assert_same(pipe.generate(_rows(pipe)), plain_results)


def test_compiled_path_keeps_outputs(plain_results):
    pipe = _pipe(SamplerOptions(compile=True))
    _assert_same(pipe.generate(_rows(pipe)), plain_results)


def test_uncached_captions_survive_rows_joining_mid_batch():
    pipe = _pipe(PLAIN)
    first, late = pipe.params("a red circle", seed=1), pipe.params("three green triangles in a row", seed=2)
    state = pipe.sampler.start([first], tags=[0])
    for _ in range(4):
        pipe.sampler.step(state)
    state = BatchState.merge(state, pipe.sampler.start([late], tags=[1]))
    results = {}
    while len(state):
        pipe.sampler.step(state)
        done, state = pipe.sampler.finish(state)
        results.update({r.tag: r for r in done})
    fast = _pipe(SamplerOptions())
    _assert_same([results[0], results[1]], fast.generate([first, late]))


# --- bucketed shapes (CUDA-graph ready) -----------------------------------------------------------------


def test_bucket_rounds_up_and_never_down():
    assert [bucket(n, BATCH_BUCKETS) for n in (1, 2, 3, 5, 9, 33, 64, 65, 130)] == [
        1,
        2,
        4,
        8,
        16,
        64,
        64,
        128,
        192,
    ]
    assert [bucket(n, CAPTION_BUCKETS) for n in (1, 32, 33, 129, 300)] == [32, 32, 64, 300, 300]


def test_padded_buckets_keep_outputs(plain_results):
    """3 rows run as 4 (and the head's rows as a bucket too), captions padded: the same tokens and pixels."""
    pipe = _pipe(SamplerOptions(pad_buckets=True))
    shapes = []
    forward = pipe.sampler._forward
    pipe.sampler._forward = lambda ids, text, grid: (
        shapes.append((ids.shape[0], text.length)) or forward(ids, text, grid)
    )
    _assert_same(pipe.generate(_rows(pipe)[:3]), plain_results[:3])
    assert {b for b, _ in shapes} <= {2 * 4, 2 * 2, 2 * 1}  # 2B over buckets only (rows leave as they finish)
    assert (2 * 4, 32) in shapes  # 3 rows padded to 4, captions to the 32-token bucket


def test_compiled_fullgraph_on_buckets_keeps_outputs(plain_results):
    """``compile`` with buckets: static shapes, ``fullgraph=True`` (a graph break would raise)."""
    pipe = _pipe(SamplerOptions(compile=True, pad_buckets=True))
    _assert_same(pipe.generate(_rows(pipe)[:3]), plain_results[:3])


def test_cuda_graphs_need_buckets():
    with pytest.raises(ValueError, match="pad_buckets"):
        SamplerOptions(cuda_graphs=True, pad_buckets=False).resolve(torch.device("cpu"), torch.float32)
    assert SamplerOptions(cuda_graphs=True).resolve(torch.device("cpu"), torch.float32).pad_buckets


# --- no host sync inside a step or the head loop ---------------------------------------------------------

_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class _HostReads:
    """Counts every Tensor method that copies a value to the host (on CUDA each one blocks until the GPU
    catches up), and every ``torch.tensor`` built from host data (a host->device copy), while active."""

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        self.uploads = 0
        self.active = False
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        original_tensor = torch.tensor

        def tensor(*args, **kwargs):
            if self.active:
                self.uploads += 1
            return original_tensor(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)

    def _wrap(self, name, original):
        def method(t, *args, **kwargs):
            if self.active:
                self.reads.append(name)
            return original(t, *args, **kwargs)

        return method


@pytest.mark.parametrize("pad", [False, True], ids=["eager", "buckets"])
def test_a_step_reads_the_device_once_and_the_head_loop_never(monkeypatch, pad):
    pipe = _pipe(SamplerOptions(pad_buckets=pad))
    rows = _rows(pipe)[:3]
    state = pipe.sampler.start(rows)
    probe = _HostReads(monkeypatch)
    for _ in range(3):
        probe.active = True
        pipe.sampler.step(state)
        probe.active = False
        assert probe.reads == ["tolist"] and probe.uploads == 0, (probe.reads, probe.uploads)
        probe.reads.clear()
    head = pipe.generator.diffloss
    calls = []
    original = head.denoise_step

    def counted(*args):
        probe.active = True
        calls.append(1)
        try:
            return original(*args)
        finally:
            probe.active = False

    cond = torch.randn(6, pipe.config.generator.hidden_size)
    g = torch.Generator().manual_seed(0)
    head.sample(
        cond,
        lambda kind: torch.randn(6, pipe.config.generator.token_size, generator=g),
        uncond=torch.randn_like(cond),
        guidance=torch.full((6,), 2.0),
        steps=8,
        forward=counted,
    )
    assert len(calls) == 8 and probe.reads == [] and probe.uploads == 0
