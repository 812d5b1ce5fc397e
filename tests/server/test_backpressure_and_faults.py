"""Queue full (429 + Retry-After), deadlines (refused at admission, 504 once passed), clients that
disconnect (rows dropped, counted), a batch whose sampler raises (only its rows fail), out-of-memory (split,
retry, lower cap). Faults are injected at the pipeline level by wrapping ``pipe.sampler.step``."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from server_harness import StepHook, decode, live_server, metric, metrics_text, same_image, serve

from dcar.server import routes

pytestmark = pytest.mark.anyio


def hold_engine(pipe, monkeypatch) -> threading.Event:
    """Every step after warm-up waits for the returned event: the running row holds the engine until set."""
    gate = threading.Event()

    def hold(state):
        if state.rows[0].params.prompt != "warm-up":
            gate.wait(30)

    StepHook(pipe, monkeypatch, fail=hold)
    return gate


async def test_full_queue_answers_429_with_a_computed_retry_after(pipe, monkeypatch):
    gate = hold_engine(pipe, monkeypatch)
    async with serve(pipe, max_batch_size=1, max_queue=2, max_n=1, max_wait_ms=0) as client:
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "runs", "steps": 3}))
        while metric(await metrics_text(client), "dcar_rows_running") < 1:
            await asyncio.sleep(0.01)
        queued = [
            asyncio.create_task(client.post("/v1/generate", json={"prompt": f"waits {i}", "steps": 3}))
            for i in range(2)
        ]
        while metric(await metrics_text(client), "dcar_queue_size") < 2:
            await asyncio.sleep(0.01)
        r = await client.post("/v1/generate", json={"prompt": "one too many", "steps": 3})
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "queue_full" and "max_queue=2" in err["message"]
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        assert [t.status_code for t in await asyncio.gather(running, *queued)] == [200, 200, 200]
        assert metric(await metrics_text(client), "dcar_rejections_total", reason="queue_full") == 1
        assert (await client.post("/v1/generate", json={"prompt": "after", "steps": 2})).status_code == 200


async def test_running_rows_stay_counted_while_new_requests_queue_mid_step(pipe, monkeypatch):
    gate = hold_engine(pipe, monkeypatch)
    async with serve(pipe, max_batch_size=1, max_queue=4, max_n=1, max_wait_ms=0) as client:
        running = asyncio.create_task(client.post("/v1/generate", json={"prompt": "runs", "steps": 2}))
        while metric(await metrics_text(client), "dcar_rows_running") < 1:
            await asyncio.sleep(0.01)
        # A submission during the held step republishes the gauges; the admitted row is still running.
        queued = asyncio.create_task(client.post("/v1/generate", json={"prompt": "waits", "steps": 2}))
        while metric(await metrics_text(client), "dcar_queue_size") < 1:
            await asyncio.sleep(0.01)
        assert metric(await metrics_text(client), "dcar_rows_running") == 1
        gate.set()
        assert [t.status_code for t in await asyncio.gather(running, queued)] == [200, 200]


async def test_a_timeout_shorter_than_one_image_on_an_idle_server_is_400(pipe):
    async with serve(pipe) as client:
        for timeout in (0.0005, 1e-300):  # no retry can help: 400, not 429
            r = await client.post("/v1/generate", json={"prompt": "hurry", "timeout": timeout})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "timeout_too_short" and err["param"] == "timeout"
            assert f"timeout={timeout:g}" in err["message"] and "idle server" in err["message"]
            assert "retry-after" not in r.headers
        assert metric(await metrics_text(client), "dcar_rejections_total", reason="deadline") == 0
        assert (
            await client.post("/v1/generate", json={"prompt": "no hurry", "timeout": 30})
        ).status_code == 200


async def test_a_passed_deadline_is_504_and_its_rows_leave_the_batch(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe, max_wait_ms=0) as client:
        hook.delay = 0.25  # the cost model learnt fast steps during warm-up: the request is admitted
        t0 = time.monotonic()
        r = await client.post("/v1/generate", json={"prompt": "slow", "steps": 12, "timeout": 1.0})
        assert r.status_code == 504, r.text
        assert time.monotonic() - t0 < 2.5  # ended at a step boundary, not after 12 steps (3 s)
        err = r.json()["error"]
        assert (
            err["code"] == "deadline_exceeded" and err["param"] == "timeout" and "timeout=1" in err["message"]
        )
        text = await metrics_text(client)
        assert metric(text, "dcar_dropped_rows_total", reason="deadline") == 1
        assert metric(text, "dcar_wasted_seconds_total", reason="deadline") > 0.25
        assert metric(text, "dcar_rows_running") == 0
        hook.delay = 0.0
        assert (await client.post("/v1/generate", json={"prompt": "fine", "steps": 2})).status_code == 200


def test_a_client_that_disconnects_has_its_rows_dropped(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    with live_server(pipe, max_wait_ms=0) as (url, app):
        hook.delay, hook.calls = 0.1, []
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json={"prompt": "leaving", "n": 2, "steps": 12}, timeout=0.35)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(f"{url}/metrics").text
            if metric(text, "dcar_dropped_rows_total", reason="disconnected") == 2:
                break
            time.sleep(0.05)
        assert metric(text, "dcar_dropped_rows_total", reason="disconnected") == 2
        assert metric(text, "dcar_wasted_seconds_total", reason="disconnected") > 0.1
        assert metric(text, "dcar_images_generated_total", task="generate") == 0
        assert len(hook.calls) < 12  # dropped between steps, long before its last one
        assert metric(text, "dcar_requests_total", endpoint="/v1/generate", status="499") == 1
        hook.delay = 0.0
        assert (
            httpx.post(f"{url}/v1/generate", json={"prompt": "staying", "steps": 2}, timeout=30).status_code
            == 200
        )


async def test_a_batch_whose_sampler_raises_fails_only_its_own_rows(pipe, monkeypatch):
    def explode(state):
        if any("EXPLODE" in r.params.prompt for r in state.rows):
            raise RuntimeError("injected fault")

    StepHook(pipe, monkeypatch, fail=explode)
    async with serve(pipe, allowed_sizes="128x128,64x64", max_batch_size=8, max_wait_ms=1000) as client:
        bad = client.post("/v1/generate", json={"prompt": "EXPLODE", "steps": 3})
        mate = client.post("/v1/generate", json={"prompt": "same batch", "steps": 3})
        other = client.post("/v1/generate", json={"prompt": "other batch", "size": "64x64", "steps": 3})
        bad, mate, other = await asyncio.gather(bad, mate, other)
        assert bad.status_code == 500
        err = bad.json()["error"]
        assert err["code"] == "internal_error" and err["request_id"] == bad.headers["x-request-id"]
        assert "injected fault" in err["message"] and bad.headers["x-request-id"] in err["message"]
        assert mate.status_code == 500  # it shared the forward that raised
        assert other.status_code == 200  # another batch (another size) is untouched
        assert (await client.get("/readyz")).status_code == 200  # the probe generation passed
        after = await client.post("/v1/generate", json={"prompt": "afterwards", "steps": 3})
        assert after.status_code == 200
        text = await metrics_text(client)
        assert metric(text, "dcar_failed_rows_total", reason="error") == 2


async def test_out_of_memory_splits_the_batch_retries_and_lowers_the_cap(pipe, monkeypatch):
    def small_memory(state):
        if len(state) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        if any("HUGE" in r.params.prompt for r in state.rows):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    hook = StepHook(pipe, monkeypatch, fail=small_memory)
    request = {"prompt": "six at once", "n": 6, "seed": 40, "steps": 4}
    async with serve(pipe, max_batch_size=8, max_wait_ms=0) as client:
        r = await client.post("/v1/generate", json=request)
        assert r.status_code == 200, r.text
        images = [decode(im["b64_json"]) for im in r.json()["images"]]
        text = await metrics_text(client)
        assert metric(text, "dcar_oom_total") >= 2 and metric(text, "dcar_batch_splits_total") >= 2
        assert metric(text, "dcar_batch_size_limit") <= 2
        assert (await client.get("/readyz")).status_code == 200
        for i, image in enumerate(images):  # the split changed no image
            hook.calls.clear()
            single = await client.post("/v1/generate", json={**request, "n": 1, "seed": 40 + i})
            assert same_image(decode(single.json()["images"][0]["b64_json"]), image)
        huge = await client.post("/v1/generate", json={"prompt": "HUGE", "steps": 2})
        assert huge.status_code == 500 and huge.json()["error"]["code"] == "out_of_memory"
        assert metric(await metrics_text(client), "dcar_failed_rows_total", reason="out_of_memory") == 1
        assert (await client.post("/v1/generate", json={"prompt": "small", "steps": 2})).status_code == 200


def test_an_unexpected_error_is_a_500_with_its_request_id_in_the_header_too(pipe, monkeypatch):
    """An exception no handler expects (here the image encoder's) is answered outside the edge middleware
    that adds ``X-Request-Id``; the header must still be there, equal to the body's ``request_id``."""

    def broken_encoder(*args, **kwargs):
        raise RuntimeError("the encoder broke")

    monkeypatch.setattr(routes, "encode_image", broken_encoder)
    with live_server(pipe) as (url, app):
        for sent in ({"X-Request-Id": "trace-500"}, {}):
            r = httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 2}, headers=sent, timeout=30)
            assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
            assert r.headers.get("x-request-id") == r.json()["error"]["request_id"]
            assert r.headers["x-request-id"] == sent.get("X-Request-Id", r.headers["x-request-id"])
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dcar_requests_total", endpoint="/v1/generate", status="500") == 2


async def test_requests_accepted_before_the_engine_failed_for_good_are_not_counted_as_refused(
    pipe, monkeypatch
):
    """A batch error whose probe generation also fails ends every accepted job with 503 engine_failed; those
    jobs were accepted, so their rows count as dropped (failed), not in dcar_rejections_total, which counted
    them as not_ready refusals. Requests sent after that are refusals."""
    gate = threading.Event()

    def broken(state):
        if state.rows[0].params.prompt != "warm-up":
            gate.wait(30)  # the second request is queued behind this batch before it fails
            raise RuntimeError("the device is gone")

    StepHook(pipe, monkeypatch, fail=broken)
    async with serve(pipe, max_batch_size=1, max_wait_ms=0) as client:
        first = asyncio.create_task(client.post("/v1/generate", json={"prompt": "a", "steps": 2}))
        second = asyncio.create_task(client.post("/v1/generate", json={"prompt": "b", "steps": 2}))
        deadline = time.monotonic() + 10
        while metric(await metrics_text(client), "dcar_queue_size") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        gate.set()
        ran, queued = sorted([await first, await second], key=lambda r: r.status_code)  # either may run
        assert ran.status_code == 500 and queued.status_code == 503, (ran.text, queued.text)
        assert queued.json()["error"]["code"] == "engine_failed"
        later = await client.post("/v1/generate", json={"prompt": "c", "steps": 2})
        assert later.status_code == 503
        text = await metrics_text(client)
        assert metric(text, "dcar_dropped_rows_total", reason="failed") == 1
        assert metric(text, "dcar_rejections_total", reason="not_ready") == 1  # the later one only


async def test_a_crashed_engine_loop_fails_its_jobs_and_empties_the_running_gauge(pipe, monkeypatch):
    """A bug in the loop itself (here: delivering an outcome) ends every job with a 500 naming the crash and
    leaves the server not ready; the rows that were running are counted as dropped, and dcar_rows_running
    goes back to 0 (it stayed at the crashed batch's rows, since no later step boundary dropped them)."""
    import dcar.server.engine as engine_module

    def broken_deliver(*args, **kwargs):
        raise RuntimeError("a bug in deliver")

    async with serve(pipe, max_wait_ms=200) as client:
        monkeypatch.setattr(engine_module, "deliver", broken_deliver)
        r = await client.post("/v1/generate", json={"prompt": "a", "n": 2, "steps": 2})
        assert r.status_code == 500, r.text
        assert "engine loop crashed: RuntimeError: a bug in deliver" in r.json()["error"]["message"]
        text = await metrics_text(client)
        assert metric(text, "dcar_rows_running") == 0
        assert metric(text, "dcar_dropped_rows_total", reason="failed") == 2
        assert metric(text, "dcar_ready") == 0
        assert (await client.get("/readyz")).status_code == 503
