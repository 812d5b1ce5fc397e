"""Auth before body: on every /v1 route a request without a valid key is refused 401 from its headers, before
the server reads its body: a client announcing a 32 MiB body gets its answer after sending 64 kB, and the
connection is closed instead of draining the rest."""

from __future__ import annotations

import json
import logging

import httpx
from reliability_harness import connect, live_dcar, read_until_closed, status_of
from server_harness import metric

KEY = "test-key-0123456789"
BIG = 32 * 2**20


def announce(url: str, path: str, content_type: str, authorization: str | None):
    """Headers for a 32 MiB body, then only its first 64 kB; returns the socket."""
    s = connect(url)
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {BIG}\r\n"
        f"{auth}\r\n".encode()
        + b"[" * 65536
    )
    return s


def test_a_32_mib_body_without_a_key_is_refused_unread_on_every_route(pipe, caplog):
    caplog.set_level(logging.INFO, logger="dcar.access")
    with live_dcar(pipe, api_keys=KEY, max_body_bytes=BIG) as (url, app):
        routes = [
            ("/v1/generate", "application/json"),
            ("/v1/images/generations", "application/json"),
            ("/v1/edit", "multipart/form-data; boundary=x"),
            ("/v1/images/edits", "multipart/form-data; boundary=x"),
        ]
        for path, ctype in routes:
            for authorization, code in (
                (None, "missing_api_key"),
                ("Bearer not-the-key-at-all", "invalid_api_key"),
            ):
                response = read_until_closed(announce(url, path, ctype, authorization))
                assert status_of(response) == 401, (path, response[:300])
                head, body = response.split(b"\r\n\r\n", 1)
                assert b"www-authenticate: bearer" in head.lower() and b"connection: close" in head.lower()
                assert json.loads(body)["error"]["code"] == code, (path, body)
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dcar_rejections_total", reason="unauthorized") == 8
        assert metric(text, "dcar_rejections_total", reason="invalid") == 0  # no body was parsed
        for path, _ in routes:  # counted under their route, although refused before the router ran
            assert metric(text, "dcar_requests_total", endpoint=path, status="401") == 2, path
        assert metric(text, "dcar_requests_total", endpoint="other", status="401") == 0
        nowhere = httpx.post(f"{url}/v1/nowhere", json={})
        assert nowhere.status_code == 401  # an unknown /v1 path is refused alike, and stays "other"
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "dcar_requests_total", endpoint="other", status="401") == 1
        logged = [(r.route, r.status) for r in caplog.records if r.name == "dcar.access" and r.status == 401]
        assert sorted(logged, key=str) == sorted([(p, 401) for p, _ in routes] * 2 + [(None, 401)], key=str)
        ok = httpx.post(
            f"{url}/v1/generate",
            json={"prompt": "a key", "steps": 2},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
