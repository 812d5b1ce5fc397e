"""Logs: with ``DCAR_LOG_FORMAT=json`` a real ``dcar serve`` writes only JSON lines, uvicorn's own records
included, and exactly one ``dcar.access`` record per finished request (request id, route, status, duration,
n, size, steps, queue wait, key fingerprint, user); prompts only with ``log_prompts``; the key never."""

from __future__ import annotations

import hashlib
import json
import logging
import signal

import httpx
import pytest
from server_harness import serve, start_dcar_serve

KEY = "sk-log-test-key-123"


def test_json_logs_one_record_per_finished_request(tmp_path):
    url, proc, log = start_dcar_serve(
        tmp_path / "serve.log", "--no-warmup", "--api-key", KEY, env={"DCAR_LOG_FORMAT": "json"}
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        ok = httpx.post(
            f"{url}/v1/generate",
            json={"prompt": "secret prompt", "n": 2, "steps": 2},
            headers={**auth, "X-Request-Id": "trace-me-1"},
            timeout=60,
        )
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-me-1"
        openai = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "x", "user": "user-7", "steps": 2},
            headers=auth,
            timeout=60,
        )
        assert openai.status_code == 200
        errors = [
            httpx.post(f"{url}/v1/generate", json={"prompt": "x", "step": 2}, headers=auth, timeout=10),
            httpx.post(f"{url}/v1/generate", json={"prompt": "x", "steps": 999}, headers=auth, timeout=10),
            httpx.post(f"{url}/v1/generate", json={"prompt": "x"}, timeout=10),
            httpx.get(f"{url}/nowhere", timeout=10),
        ]
        assert [r.status_code for r in errors] == [422, 400, 401, 404]
        for r in errors:  # every error body names its request id
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    log.seek(0)
    text = log.read()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own startup records
    assert KEY not in text and "secret prompt" not in text

    access = [r for r in records if r["logger"] == "dcar.access"]
    by_id = {}
    for r in access:
        by_id.setdefault(r["request_id"], []).append(r)
    assert all(len(v) == 1 for v in by_id.values())  # one record per request
    first = by_id["trace-me-1"][0]
    assert (first["method"], first["route"], first["status"]) == ("POST", "/v1/generate", 200)
    assert (first["n"], first["size"], first["steps"], first["task"]) == (2, "128x128", 2, "generate")
    assert first["duration_s"] > 0 and first["queue_wait_s"] >= 0 and "prompt" not in first
    assert first["priority"] == 0
    assert first["key_fingerprint"] == "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert by_id[openai.headers["x-request-id"]][0]["user"] == "user-7"
    for r in errors:
        record = by_id[r.headers["x-request-id"]][0]
        assert record["status"] == r.status_code
    assert by_id[errors[2].headers["x-request-id"]][0]["key_fingerprint"] is None  # no key presented
    assert by_id[errors[3].headers["x-request-id"]][0]["route"] is None  # unknown path: no route template


@pytest.mark.anyio
@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_are_logged_only_when_asked(pipe, caplog, log_prompts):
    caplog.set_level(logging.INFO, logger="dcar.access")
    async with serve(pipe, log_prompts=log_prompts) as client:
        r = await client.post("/v1/generate", json={"prompt": "a private idea", "steps": 2})
        assert r.status_code == 200
    rid = r.headers["x-request-id"]
    [record] = [x for x in caplog.records if getattr(x, "request_id", None) == rid]
    assert getattr(record, "prompt", None) == ("a private idea" if log_prompts else None)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path, user", [("/v1/generate", None), ("/v1/images/generations", "u-9")], ids=["native", "openai"]
)
async def test_a_request_the_engine_refuses_is_logged_with_what_it_asked(pipe, caplog, path, user):
    """Admission's refusals (here 400 timeout_too_short; under load 429) are logged with n, size, steps and
    the OpenAI user, so that refused traffic can be told apart and attributed."""
    caplog.set_level(logging.INFO, logger="dcar.access")
    request = {"prompt": "x", "n": 2, "steps": 3, "timeout": 1e-4, **({"user": user} if user else {})}
    async with serve(pipe) as client:
        r = await client.post(path, json=request)
        assert r.status_code == 400 and r.json()["error"]["code"] == "timeout_too_short"
    rid = r.headers["x-request-id"]
    [record] = [x for x in caplog.records if getattr(x, "request_id", None) == rid]
    assert (record.status, getattr(record, "n", None), getattr(record, "steps", None)) == (400, 2, 3)
    assert getattr(record, "size", None) == "128x128" and getattr(record, "user", None) == user
