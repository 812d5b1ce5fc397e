"""Idempotency-Key: a retry gets the first response (once drawn), never a second image; other bodies under
the same key are refused; failures are not kept; a client that leaves does not cancel a keyed request."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_harness import StepHook, live_server, metric, metrics_text, png_bytes, serve

pytestmark = pytest.mark.anyio

KEY = {"Idempotency-Key": "order-7f3a"}


def generated(hook: StepHook, prompt: str) -> int:
    """How many sampler steps ran rows of ``prompt`` (one image, ``steps`` forwards)."""
    return sum(1 for call in hook.calls for p, _ in call if p == prompt)


async def test_a_retry_with_the_same_key_gets_the_first_response_and_draws_nothing(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe) as client:
        body = {"prompt": "a keyed circle", "steps": 2}  # no seed: a second drawing would differ
        first = await client.post("/v1/generate", json=body, headers=KEY)
        assert first.status_code == 200, first.text
        assert "idempotent-replayed" not in first.headers
        again = await client.post("/v1/generate", json=body, headers=KEY)
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content  # the same seed and image bytes
        assert generated(hook, "a keyed circle") == 2  # drawn once: 2 steps of one row
        assert again.headers["x-request-id"] != first.headers["x-request-id"]
        fresh = await client.post("/v1/generate", json=body, headers={"Idempotency-Key": "order-other"})
        assert "idempotent-replayed" not in fresh.headers
        assert fresh.json()["images"][0]["seed"] != first.json()["images"][0]["seed"]
        text = await metrics_text(client)
        assert metric(text, "dcar_idempotent_requests_total", outcome="first") == 2
        assert metric(text, "dcar_idempotent_requests_total", outcome="replayed") == 1


async def test_a_retry_while_the_first_runs_waits_for_it_instead_of_drawing_again(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe, max_wait_ms=0) as client:
        hook.delay, hook.calls = 0.05, []
        body = {"prompt": "a concurrent square", "steps": 6}
        a, b = await asyncio.gather(
            client.post("/v1/generate", json=body, headers=KEY),
            client.post("/v1/generate", json=body, headers=KEY),
        )
        assert a.status_code == b.status_code == 200
        assert a.content == b.content
        assert sorted(r.headers.get("idempotent-replayed", "no") for r in (a, b)) == ["no", "true"]
        assert generated(hook, "a concurrent square") == 6


async def test_the_same_key_with_another_body_is_refused_and_names_the_header(pipe):
    async with serve(pipe) as client:
        r = await client.post("/v1/generate", json={"prompt": "one", "steps": 2}, headers=KEY)
        assert r.status_code == 200
        r = await client.post("/v1/generate", json={"prompt": "another", "steps": 2}, headers=KEY)
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["code"] == "idempotency_key_reused" and err["param"] == "Idempotency-Key"
        assert "order-7f3a" in err["message"] and "idempotency_ttl_s=3600" in err["message"]
        # asking for the raw image instead of JSON is another request too
        r = await client.post(
            "/v1/generate", json={"prompt": "one", "steps": 2}, headers={**KEY, "Accept": "image/png"}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
        # the same key on another route is another request; another tenant's key space is its own
        r = await client.post("/v1/images/generations", json={"prompt": "another"}, headers=KEY)
        assert r.status_code == 200, r.text
        text = await metrics_text(client)
        assert metric(text, "dcar_idempotent_requests_total", outcome="conflict") == 2
        assert metric(text, "dcar_rejections_total", reason="invalid") == 2  # refused, like any 4xx


async def test_keys_are_scoped_by_api_key(pipe):
    async with serve(pipe, api_keys=["alice-key-0001", "bob-key-0001"]) as client:
        body = {"prompt": "a private triangle", "steps": 2}
        alice = {**KEY, "Authorization": "Bearer alice-key-0001"}
        bob = {**KEY, "Authorization": "Bearer bob-key-0001"}
        first = await client.post("/v1/generate", json=body, headers=alice)
        theirs = await client.post("/v1/generate", json=body, headers=bob)
        assert first.status_code == theirs.status_code == 200
        assert "idempotent-replayed" not in theirs.headers  # bob's request was drawn for bob
        assert (await client.post("/v1/generate", json=body, headers=alice)).content == first.content


async def test_a_refused_first_request_is_not_kept_and_its_retry_runs(pipe):
    async with serve(pipe, max_steps=4) as client:
        r = await client.post("/v1/generate", json={"prompt": "x", "steps": 9}, headers=KEY)
        assert r.status_code == 400
        r = await client.post("/v1/generate", json={"prompt": "x", "steps": 9}, headers=KEY)
        assert r.status_code == 400 and "idempotent-replayed" not in r.headers
        r = await client.post("/v1/generate", json={"prompt": "x", "steps": 2}, headers=KEY)
        assert r.status_code == 200, r.text  # not a conflict: nothing was kept under the key


@pytest.mark.parametrize(
    "key,why",
    [
        ("", "got 0 characters"),
        ("a b", "no spaces"),
        ("k" * 256, "got 256 characters"),
        ("é", "visible ASCII"),
    ],
)
async def test_a_malformed_key_is_refused_before_any_work(pipe, key, why):
    async with serve(pipe) as client:
        r = await client.post(
            "/v1/generate",
            json={"prompt": "x", "steps": 2},
            headers={"Idempotency-Key": key.encode("utf-8")},
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "invalid_idempotency_key" and err["param"] == "Idempotency-Key"
        assert why in err["message"]


async def test_multipart_edits_are_replayed_too(pipe):
    from PIL import Image

    image = png_bytes(Image.new("RGB", (128, 128), (200, 30, 30)))
    mask = png_bytes(Image.new("RGBA", (128, 128), (0, 0, 0, 0)))
    files = {"image": ("in.png", image, "image/png"), "mask": ("m.png", mask, "image/png")}
    data = {"prompt": "a blue circle", "steps": "2"}
    async with serve(pipe) as client:
        # each request gets a new random multipart boundary (so do the openai SDK's retries): same form
        first = await client.post("/v1/images/edits", files=files, data=data, headers=KEY)
        assert first.status_code == 200, first.text
        again = await client.post("/v1/images/edits", files=files, data=data, headers=KEY)
        assert again.headers["idempotent-replayed"] == "true" and again.content == first.content
        other = await client.post("/v1/images/edits", files=files, data={**data, "steps": "3"}, headers=KEY)
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_keyed_request_runs_to_the_end_when_its_client_leaves_and_the_retry_gets_it(pipe, monkeypatch):
    """Without a key a departed client's rows are dropped (test_backpressure_and_faults.py); with one the
    image is finished and kept, so the client's retry costs nothing."""
    hook = StepHook(pipe, monkeypatch)
    with live_server(pipe, max_wait_ms=0) as (url, _app):
        hook.delay, hook.calls = 0.1, []
        body = {"prompt": "a patient circle", "steps": 8}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json=body, headers=KEY, timeout=0.3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and generated(hook, "a patient circle") < 8:
            time.sleep(0.05)
        time.sleep(0.2)
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dcar_dropped_rows_total", reason="disconnected") == 0
        assert metric(text, "dcar_images_generated_total", task="generate") == 1
        hook.delay = 0.0
        retry = httpx.post(f"{url}/v1/generate", json=body, headers=KEY, timeout=30)
        assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
        assert generated(hook, "a patient circle") == 8  # drawn once


async def test_idempotency_ttl_zero_ignores_the_header(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe, idempotency_ttl_s=0) as client:
        body = {"prompt": "an unkept square", "steps": 2}
        a = await client.post("/v1/generate", json=body, headers=KEY)
        b = await client.post("/v1/generate", json=body, headers=KEY)
        assert a.status_code == b.status_code == 200 and "idempotent-replayed" not in b.headers
        assert generated(hook, "an unkept square") == 4


async def test_a_streamed_response_is_not_kept_and_its_retry_streams_anew(pipe, monkeypatch):
    hook = StepHook(pipe, monkeypatch)
    async with serve(pipe) as client:
        body = {"prompt": "a streamed triangle", "steps": 2, "stream": True}
        for _ in range(2):
            r = await client.post("/v1/generate", json=body, headers=KEY)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert "idempotent-replayed" not in r.headers and "event: images" in r.text
        assert generated(hook, "a streamed triangle") == 4


@pytest.mark.parametrize("key", ["Idempotency-Key: order-half-sent\r\n", ""])
def test_a_request_whose_client_leaves_mid_body_ends_as_499_not_as_an_error(pipe, key):
    """Its body never arrived, so nothing ran: the request ended because its client left (499), not with a
    server error (500, with a key) nor as the client's bad request (400, without one: FastAPI turned the
    disconnect into "There was an error parsing the body")."""
    import socket

    with live_server(pipe) as (url, _app):
        host, port = url.removeprefix("http://").split(":")
        head = "POST /v1/generate HTTP/1.1\r\nHost: dcar\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: 100\r\n{key}\r\n"
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head.encode() + b'{"prompt": "a half')
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(f"{url}/metrics").text
            counted = {
                code: metric(text, "dcar_requests_total", endpoint="/v1/generate", status=code)
                for code in ("499", "500", "400")
            }
            if sum(counted.values()):
                break
            time.sleep(0.05)
        assert counted == {"499": 1, "500": 0, "400": 0}
