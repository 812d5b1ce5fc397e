"""Every optimisation keeps the outputs: tokens identical, pixels within 1e-4 of the plain path."""

from __future__ import annotations

import pytest
import torch

from dcar.model.config import pipeline_preset
from dcar.model.pipeline import Pipeline
from dcar.model.sampler import BatchState, SamplerOptions

PLAIN = SamplerOptions(cache_text_kv=False, batch_cfg=False)


def _pipe(options: SamplerOptions) -> Pipeline:
    return Pipeline.from_config(pipeline_preset("tiny"), seed=0, options=options)


def _rows(pipe):
    return [pipe.params("a red circle on the left", seed=1),
            pipe.params("two blue squares", seed=2, guidance_scale=2.5, steps=8),
            pipe.params("x", seed=3, guidance_decay="linear"),
            pipe.params("a yellow triangle above a purple square", seed=4, randomize_temperature=0.7)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens)
        assert (x.image - y.image).abs().max() < 1e-4


@pytest.fixture(scope="module")
def plain_results():
    pipe = _pipe(PLAIN)
    return pipe.generate(_rows(pipe))


@pytest.mark.parametrize("options", [SamplerOptions(), SamplerOptions(cache_text_kv=False),
                                     SamplerOptions(batch_cfg=False), SamplerOptions(channels_last_decoder=True)],
                         ids=["default", "no-kv-cache", "no-cfg-batch", "channels-last-decoder"])
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
