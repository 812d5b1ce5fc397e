"""Concurrent requests share forwards, rows join a running batch between steps, and
every image equals the image of the same request sent alone (per-row generators)."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image
from server_harness import StepHook, decode, metric, metrics_text, png_bytes, same_image, serve

pytestmark = pytest.mark.anyio


async def alone(client, request: dict):
    """The request sent while nothing else runs: it is a batch of its own."""
    r = await client.post("/v1/generate", json=request)
    assert r.status_code == 200, r.text
    return [decode(im["b64_json"]) for im in r.json()["images"]]


async def test_eight_concurrent_requests_share_batches_and_match_alone(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    requests = [{"prompt": f"shape number {i}", "seed": 100 + i, "steps": 6} for i in range(8)]
    async with serve(pipe, max_batch_size=8, max_wait_ms=5000) as client:  # starts once all 8 wait
        hook.calls.clear()
        responses = await asyncio.gather(*(client.post("/v1/generate", json=r) for r in requests))
        assert [r.status_code for r in responses] == [200] * 8
        together = [decode(r.json()["images"][0]["b64_json"]) for r in responses]

        text = await metrics_text(client)
        forwards = metric(text, "dcar_batch_size_count")
        rows = metric(text, "dcar_batch_size_sum")
        assert forwards < 8 * 6, "the 8 requests were not batched"
        assert rows / forwards > 1
        assert max(len(c) for c in hook.calls) == 8  # one forward held all eight

    async with serve(pipe, max_wait_ms=0) as client:  # one at a time: each request is a batch of its own
        for request, image in zip(requests, together):
            hook.calls.clear()
            (single,) = await alone(client, request)
            assert all(len(c) == 1 for c in hook.calls)
            assert same_image(image, single), request


async def test_edits_and_generations_share_a_batch(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    image = png_bytes(Image.new("RGB", (128, 128), (200, 30, 30)))
    mask_img = Image.new("L", (128, 128), 0)
    mask_img.paste(255, (0, 0, 64, 64))
    mask = png_bytes(mask_img)
    async with serve(pipe, max_batch_size=4, max_wait_ms=1000) as client:
        hook.calls.clear()
        gen = client.post("/v1/generate", json={"prompt": "gen row", "seed": 1, "steps": 4})
        edit = client.post(
            "/v1/edit",
            data={"prompt": "edit row", "seed": 2, "steps": "4"},
            files={"image": ("i.png", image, "image/png"), "mask": ("m.png", mask, "image/png")},
        )
        g, e = await asyncio.gather(gen, edit)
        assert g.status_code == 200 and e.status_code == 200, (g.text, e.text)
        assert any({p for p, _ in c} == {"gen row", "edit row"} for c in hook.calls)


async def test_a_request_joins_a_running_batch_at_step_k(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch, delay=0.03)
    first = {"prompt": "the first one", "seed": 11, "steps": 20}
    second = {"prompt": "the late one", "seed": 22, "steps": 12}
    async with serve(pipe, max_batch_size=4, max_wait_ms=0) as client:
        hook.calls.clear()
        task_a = asyncio.create_task(client.post("/v1/generate", json=first))
        while not any(step >= 3 for c in hook.calls for p, step in c if p == first["prompt"]):
            await asyncio.sleep(0.005)
        task_b = asyncio.create_task(client.post("/v1/generate", json=second))
        running = 0
        while not task_b.done():
            running = max(running, metric(await metrics_text(client), "dcar_rows_running"))
            await asyncio.sleep(0.01)
        ra, rb = await task_a, await task_b
        assert ra.status_code == 200 and rb.status_code == 200
        assert running == 2, "the running-rows gauge never showed both rows"

        joined = [dict(c) for c in hook.calls if len(c) == 2]
        assert joined, "the late request never shared a forward with the first"
        k = joined[0][first["prompt"]]
        assert k >= 3 and joined[0][second["prompt"]] == 0  # admitted at step 0 while the first was at step k
        assert max(len(c) for c in hook.calls) == 2

        monkeypatch.setattr(hook, "delay", 0.0)
        (a_alone,) = await alone(client, first)
        (b_alone,) = await alone(client, second)
        assert same_image(decode(ra.json()["images"][0]["b64_json"]), a_alone)
        assert same_image(decode(rb.json()["images"][0]["b64_json"]), b_alone)
