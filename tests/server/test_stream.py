"""``stream=true`` answers Server-Sent Events: one progress event per unmasking step, in order,
with a small preview when asked, then the images; a client that leaves mid-stream has its rows dropped."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from server_harness import StepHook, decode, live_server, metric, metrics_text, same_image, serve

pytestmark = pytest.mark.anyio


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Events as (name, data); comments (keep-alive) left out."""
    events = []
    for block in text.strip().split("\n\n"):
        if block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_stream_sends_each_step_in_order_then_the_images(pipe):
    async with serve(pipe) as client:
        request = {"prompt": "streamed circle", "seed": 4, "steps": 7, "stream": True, "preview": True}
        r = await client.post("/v1/generate", json=request)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        kinds = [kind for kind, _ in events]
        assert kinds == ["progress"] * 7 + ["images"]
        progress = [data for _, data in events[:-1]]
        assert [p["step"] for p in progress] == list(range(1, 8))
        assert all(p["steps"] == 7 and p["tokens"] == 16 and p["index"] == 0 for p in progress)
        revealed = [p["revealed"] for p in progress]
        assert revealed == sorted(revealed) and revealed[-1] == 16 and revealed[0] < 16
        for p in progress:
            preview = decode(p["preview"])
            assert max(preview.shape[:2]) <= 64
        final = events[-1][1]
        streamed = decode(final["images"][0]["b64_json"])
        plain = await client.post("/v1/generate", json={**request, "stream": False, "preview": False})
        assert same_image(streamed, decode(plain.json()["images"][0]["b64_json"]))


async def test_stream_without_preview_and_with_several_images(pipe):
    async with serve(pipe) as client:
        r = await client.post("/v1/generate", json={"prompt": "two", "n": 2, "steps": 3, "stream": True})
        events = parse_sse(r.text)
        progress = [d for k, d in events if k == "progress"]
        assert len(progress) == 6 and all("preview" not in d for d in progress)
        for index in (0, 1):
            assert [d["step"] for d in progress if d["index"] == index] == [1, 2, 3]
        assert events[-1][0] == "images" and len(events[-1][1]["images"]) == 2


async def test_stream_reports_a_failure_as_an_error_event(pipe, monkeypatch):
    def explode(state):
        if state.rows[0].params.prompt == "fragile" and state.rows[0].step == 2:
            raise RuntimeError("broke at step 3")

    StepHook(pipe, monkeypatch, fail=explode)
    async with serve(pipe) as client:
        r = await client.post("/v1/generate", json={"prompt": "fragile", "steps": 5, "stream": True})
        events = parse_sse(r.text)
        assert [k for k, _ in events] == ["progress", "progress", "error"]
        assert events[-1][1]["error"]["code"] == "internal_error"


def test_leaving_a_stream_drops_the_rows(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    with live_server(pipe, max_wait_ms=0) as (url, app):
        hook.delay, hook.calls = 0.05, []
        with httpx.stream(
            "POST", f"{url}/v1/generate", json={"prompt": "bye", "steps": 30, "stream": True}, timeout=30
        ) as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break  # leave after the first step
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(f"{url}/metrics").text
            if metric(text, "dcar_dropped_rows_total", reason="disconnected") == 1:
                break
            time.sleep(0.05)
        assert metric(text, "dcar_dropped_rows_total", reason="disconnected") == 1
        assert len(hook.calls) < 30


async def test_a_queued_stream_sends_its_place_and_keep_alive_comments(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe, max_batch_size=1, max_wait_ms=0, sse_keepalive_s=0.05) as client:
        hook.delay, hook.calls = 0.05, []  # one row at a time: the first request holds it for about a second
        first = asyncio.create_task(client.post("/v1/generate", json={"prompt": "first", "steps": 20}))
        while not hook.calls:
            await asyncio.sleep(0.01)
        r = await client.post("/v1/generate", json={"prompt": "second", "steps": 2, "stream": True})
        blocks = r.text.strip().split("\n\n")
        kinds = ["comment" if b.startswith(":") else b.split("\n")[0].removeprefix("event: ") for b in blocks]
        assert kinds[0] == "queued" and kinds[-1] == "images", kinds
        queued = json.loads(blocks[0].split("data: ", 1)[1])
        assert queued == {"position": 1, "queued_rows": 1}  # next in line, behind the running row
        waiting = kinds[1 : kinds.index("progress")]
        assert waiting.count("comment") >= 5 and set(waiting) == {"comment"}  # the queue took ~1 s
        assert [k for k in kinds[kinds.index("progress") :] if k != "comment"] == [
            "progress",
            "progress",
            "images",
        ]
        assert (await first).status_code == 200


def test_a_stream_is_counted_and_logged_with_the_status_of_its_outcome(pipe, monkeypatch, caplog):
    """A stream's status line is always 200; the metrics and the access record say how it ended: 499 when
    its client left before the end, an ``error`` event's status, else 200 (as a plain request would)."""

    def explode(state):
        if state.rows[0].params.prompt == "fragile" and state.rows[0].step == 1:
            raise RuntimeError("broke at step 2")

    hook = StepHook(pipe, monkeypatch, fail=explode)
    caplog.set_level(logging.INFO, logger="dcar.access")
    with live_server(pipe, max_wait_ms=0) as (url, app):
        hook.delay = 0.05
        left = {}
        for path, extra, first in (
            ("/v1/generate", {}, "event: progress"),
            ("/v1/images/generations", {"partial_images": 3}, "event: image_generation.partial_image"),
        ):
            request = {"prompt": "bye", "steps": 30, "stream": True, **extra}
            with httpx.stream("POST", f"{url}{path}", json=request, timeout=30) as r:
                left[path] = r.headers["x-request-id"]
                for line in r.iter_lines():
                    if line.startswith(first):
                        break  # leave at the first event
        failed = httpx.post(f"{url}/v1/generate", json={"prompt": "fragile", "steps": 5, "stream": True})
        assert [k for k, _ in parse_sse(failed.text)][-1] == "error"
        hook.delay = 0.0
        ok = httpx.post(f"{url}/v1/generate", json={"prompt": "fine", "steps": 2, "stream": True})
        assert [k for k, _ in parse_sse(ok.text)][-1] == "images"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the server ends a stream when it notices the client left
            text = httpx.get(f"{url}/metrics").text
            if metric(text, "dcar_dropped_rows_total", reason="disconnected") == 2:
                break
            time.sleep(0.05)
    assert metric(text, "dcar_requests_total", endpoint="/v1/generate", status="499") == 1
    assert metric(text, "dcar_requests_total", endpoint="/v1/images/generations", status="499") == 1
    assert metric(text, "dcar_requests_total", endpoint="/v1/generate", status="500") == 1
    assert metric(text, "dcar_requests_total", endpoint="/v1/generate", status="200") == 1
    assert metric(text, "dcar_requests_total", endpoint="/v1/images/generations", status="200") == 0
    status = {
        getattr(rec, "request_id", None): rec.status for rec in caplog.records if rec.name == "dcar.access"
    }
    assert status[left["/v1/generate"]] == status[left["/v1/images/generations"]] == 499
    assert status[failed.headers["x-request-id"]] == 500 and status[ok.headers["x-request-id"]] == 200


async def test_a_queued_stream_gets_its_504_when_its_deadline_passes(pipe, monkeypatch):
    """A stream waiting for a slot has no route watching its deadline (a plain request's route has one): the
    engine must end it when the deadline passes, not when the running rows free a slot much later."""
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe, max_batch_size=1, max_wait_ms=0) as client:
        hook.delay, hook.calls = 0.1, []  # warm-up measured fast steps: both requests are admitted
        first = asyncio.create_task(client.post("/v1/generate", json={"prompt": "first", "steps": 30}))
        while not hook.calls:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        request = {"prompt": "second", "steps": 2, "stream": True, "timeout": 0.8}
        r = await client.post("/v1/generate", json=request)
        waited = time.monotonic() - t0
        events = parse_sse(r.text)
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "deadline_exceeded"
        assert waited < 2.0, waited  # the first request holds the slot for about 3 s
        assert metric(await metrics_text(client), "dcar_dropped_rows_total", reason="deadline") == 1
        assert (await first).status_code == 200


@pytest.mark.parametrize(
    "path,module,body",
    [
        ("/v1/generate", "dcar.server.routes", {"prompt": "x", "steps": 2, "stream": True}),
        ("/v1/images/generations", "dcar.server.routes_openai", {"prompt": "x", "stream": True}),
    ],
)
async def test_a_stream_that_fails_after_its_200_ends_in_an_error_event(
    pipe, monkeypatch, path, module, body
):
    """An exception in the stream's own code (here the image encoding) after the 200 went out cut the body
    off mid-stream, with no ``error`` event though the API promises one; the server keeps serving."""
    import importlib

    routes = importlib.import_module(module)
    real = routes.encode_all

    async def broken(runtime, job, results, *args):
        if job.stream:
            raise OSError("the encoder broke")
        return await real(runtime, job, results, *args)

    monkeypatch.setattr(routes, "encode_all", broken)
    async with serve(pipe) as client:
        r = await client.post(path, json=body)
        assert r.status_code == 200
        kind, data = parse_sse(r.text)[-1]
        assert kind == "error"
        err = data["error"]
        assert err["code"] == "internal_error" and err["request_id"] == r.headers["x-request-id"]
        assert r.headers["x-request-id"] in err["message"]
        text = await metrics_text(client)
        assert metric(text, "dcar_requests_total", endpoint=path, status="500") == 1
        fine = await client.post(path, json={**body, "stream": False})
        assert fine.status_code == 200
