"""A row whose output holds NaN or inf is never served: it fails alone with 500 ``non_finite_output``.

NaN is injected into one row's decoded pixels (the DC-HT decoder's output, as an fp16 overflow would leave it);
the check itself (sampler -> worker -> engine -> HTTP) is the real one.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from server_harness import metric, metrics_text, serve

pytestmark = pytest.mark.anyio


def poison_rows(
    pipe, monkeypatch, marker: str = "POISON", value: float = float("nan"), seed: int | None = None
) -> list[int]:
    """Make the decoder return ``value`` in the pixels of rows whose prompt holds ``marker`` (and whose seed
    is ``seed``, when given)."""
    sampler = pipe.sampler
    original_finish, original_decode = sampler._finish_group, sampler.tokenizer.decode_tokens
    poisoned: list[int] = []

    def finish_group(state, idx, steps, use_res):
        bad = [
            j
            for j, i in enumerate(idx)
            if marker in state.rows[i].params.prompt and seed in (None, state.rows[i].params.seed)
        ]

        def decode(ids, grid, residual=None):
            out = original_decode(ids, grid, residual)
            if bad:
                out = out.clone()
                out[bad, :, :2, :2] = value  # a few pixels are enough
                poisoned.extend(bad)
            return out

        monkeypatch.setattr(sampler.tokenizer, "decode_tokens", decode)
        try:
            return original_finish(state, idx, steps, use_res)
        finally:
            monkeypatch.setattr(sampler.tokenizer, "decode_tokens", original_decode)

    monkeypatch.setattr(sampler, "_finish_group", finish_group)
    return poisoned


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
async def test_a_non_finite_row_fails_alone_and_the_server_keeps_serving(pipe, monkeypatch, value):
    poisoned = poison_rows(pipe, monkeypatch, value=value)
    async with serve(pipe, max_batch_size=8, max_wait_ms=1000) as client:
        bad = client.post("/v1/generate", json={"prompt": "POISON", "steps": 3, "seed": 1})
        mate = client.post("/v1/generate", json={"prompt": "batch mate", "steps": 3, "seed": 2})
        bad, mate = await asyncio.gather(bad, mate)
        assert poisoned, "the injected NaN never reached a decoded batch"
        assert bad.status_code == 500
        err = bad.json()["error"]
        assert err["code"] == "non_finite_output"
        assert err["request_id"] == bad.headers["x-request-id"] and err["request_id"] in err["message"]
        assert mate.status_code == 200, mate.text  # decoded in the same batch, delivered
        text = await metrics_text(client)
        assert metric(text, "dcar_failed_rows_total", reason="non_finite_output") == 1
        assert metric(text, "dcar_images_generated_total", task="generate") == 1
        assert (await client.get("/readyz")).status_code == 200
        after = await client.post("/v1/generate", json={"prompt": "afterwards", "steps": 2})
        assert after.status_code == 200


async def test_an_image_of_a_failed_request_is_not_counted_as_delivered(pipe, monkeypatch):
    """n=2 where the second row (seed 6) is non-finite: the request fails with 500, and its first image,
    finished in the same decode, is not counted in dcar_images_generated_total (it was never delivered)."""
    poisoned = poison_rows(pipe, monkeypatch, seed=6)
    async with serve(pipe, max_batch_size=8, max_wait_ms=500) as client:
        r = await client.post("/v1/generate", json={"prompt": "POISON", "n": 2, "steps": 2, "seed": 5})
        assert poisoned and r.status_code == 500, r.text
        ok = await client.post("/v1/generate", json={"prompt": "POISON", "n": 2, "steps": 2, "seed": 1})
        assert ok.status_code == 200, ok.text
        text = await metrics_text(client)
        assert metric(text, "dcar_images_generated_total", task="generate") == 2  # the second request's
        assert metric(text, "dcar_failed_rows_total", reason="non_finite_output") == 1
        # the finished image of the failed request counts as dropped, its compute as wasted
        assert metric(text, "dcar_dropped_rows_total", reason="failed") == 1
        assert metric(text, "dcar_wasted_seconds_total", reason="failed") > 0


def test_pipeline_marks_the_row_not_finite(pipe, monkeypatch):
    poison_rows(pipe, monkeypatch)
    good, bad = pipe.generate([pipe.params("fine", steps=2), pipe.params("POISON", steps=2)])
    assert good.finite and torch.isfinite(good.image).all()
    assert not bad.finite
