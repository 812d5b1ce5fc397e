"""Connection hygiene on a live server: idle sockets, headers sent a byte at a time, half-sent request lines
and stalled bodies are closed (408 where a request had begun) while a normal client is served; beyond
max_connections a connection gets 503 and is closed; every close and refusal is counted and logged."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
from reliability_harness import connect, live_dcar, read_until_closed, status_of
from server_harness import metric

LIMITS = dict(keepalive_timeout_s=0.5, header_timeout_s=0.5, body_timeout_s=0.5)


def drip(s, data: bytes, stop: threading.Event) -> None:
    """Send ``data`` one byte every 50 ms (a slowloris client) until the server closes or ``stop`` is set."""
    for b in data:
        if stop.is_set():
            return
        try:
            s.send(bytes([b]))
        except OSError:
            return
        time.sleep(0.05)


def test_slow_and_idle_connections_are_closed_while_a_normal_client_is_served(pipe, caplog):
    caplog.set_level(logging.WARNING, logger="dcar.server")
    with live_dcar(pipe, **LIMITS) as (url, app):
        idle = connect(url)
        slow_headers = connect(url)
        half_line = connect(url)
        half_line.sendall(b"POST /v1/gene")
        stalled_body = connect(url)
        stalled_body.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"prompt": '
        )
        stop = threading.Event()
        header = (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 400 + b"\r\n\r\n"
        )  # 20 s of dripping
        dripper = threading.Thread(target=drip, args=(slow_headers, header, stop), daemon=True)
        dripper.start()

        # Meanwhile a normal client gets its image.
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a red circle", "steps": 2}, timeout=60)
        assert r.status_code == 200, r.text

        assert read_until_closed(idle) == b""  # closed without a word: no request had begun
        for s in (slow_headers, half_line, stalled_body):
            response = read_until_closed(s)
            assert status_of(response) == 408, response[:200]
            body = json.loads(response.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == "request_timeout"
        stop.set()
        assert b"header_timeout_s=0.5" in read_until_closed(connect_and_send(url, b"GET /heal"))

        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dcar_connections_closed_total", reason="idle") >= 1
        assert metric(text, "dcar_connections_closed_total", reason="header_timeout") >= 3
        assert metric(text, "dcar_connections_closed_total", reason="body_timeout") == 1
        # the stalled body reached the app: it ended as a client disconnect, not as a server error
        assert metric(text, "dcar_requests_total", endpoint="/v1/generate", status="500") == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "dcar.server"]
    assert any("closed" in m and "header timeout" in m for m in logged), logged
    assert any("closed" in m and "body timeout" in m for m in logged), logged


def connect_and_send(url: str, data: bytes):
    s = connect(url)
    s.sendall(data)
    return s


def test_connections_beyond_the_cap_are_refused_with_503_and_counted(pipe, caplog):
    caplog.set_level(logging.WARNING, logger="dcar.server")
    with live_dcar(pipe, max_connections=3, keepalive_timeout_s=30) as (url, app):
        with httpx.Client(base_url=url, timeout=30) as client:  # one kept-alive connection: the first of 3
            assert client.get("/readyz").status_code == 200
            held = [connect(url), connect(url)]
            time.sleep(0.2)  # the server has accepted them
            extra = connect(url)
            response = read_until_closed(extra)
            assert status_of(response) == 503, response[:200]
            assert b"retry-after: 30" in response.lower()
            err = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
            assert err["code"] == "too_many_connections" and "max_connections=3" in err["message"]
            # the connection already held keeps working
            r = client.post("/v1/generate", json={"prompt": "a blue square", "steps": 2})
            assert r.status_code == 200, r.text
            text = client.get("/metrics").text
            assert metric(text, "dcar_connections_refused_total") == 1
            assert metric(text, "dcar_connections_open") == 3
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # room again once the held sockets are gone
            try:
                r = httpx.get(f"{url}/readyz", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert r.status_code == 200
    assert any("refused" in r.getMessage() and "max_connections=3" in r.getMessage() for r in caplog.records)
