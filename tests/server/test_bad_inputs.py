"""A table of bad inputs, each answered with the right status and an error that names the field (and the
limit where there is one); a good request sent right after each still succeeds, over the same kept-alive
connection of a live server (only refusals that leave a body unread close it).

The table is split by what is wrong: a parameter of a route (bad_inputs_params.py) or the body or the
credentials (bad_inputs_bodies.py); it runs here in its original order."""

from __future__ import annotations

import json

import httpx
from bad_inputs_bodies import AUTH_CASES, BODY_LIMIT_CASES, MALFORMED_BODY_CASES
from bad_inputs_params import (
    AUTH,
    EDIT_CASES,
    GENERATE_CASES,
    GOOD,
    KEY,
    MAX_BODY_BYTES,
    MAX_IMAGE_BYTES,
    OPENAI_CASES,
)
from reliability_harness import live_dcar

# (id, method kwargs for the request, path, expected status, param the error must name, text the message must hold)
CASES = [
    *GENERATE_CASES,
    *EDIT_CASES,
    *BODY_LIMIT_CASES,
    *OPENAI_CASES,
    *MALFORMED_BODY_CASES,
    *AUTH_CASES,
]


def closes(status: int, param: str | None, kwargs: dict) -> bool:
    """Refusals that leave a body unread (bad key, over max_body_bytes) close the connection, not drain it."""
    return (status == 413 and param is None) or (
        status == 401 and any(k in kwargs for k in ("json", "content"))
    )


def test_bad_inputs_are_refused_by_name_and_do_not_hurt_the_next_request(pipe):
    assert len(CASES) >= 60
    problems = []
    with (
        live_dcar(
            pipe,
            api_keys=KEY,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
            allowed_sizes="128x128",
        ) as (url, app),
        httpx.Client(
            base_url=url, headers=AUTH, timeout=60, limits=httpx.Limits(max_connections=1)
        ) as client,
    ):
        for name, kwargs, path, status, param, text in CASES:
            r = client.post(path, **kwargs)
            try:
                err = r.json()["error"]
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(f"{name}: {r.status_code} without an error body: {r.text[:200]}")
                continue
            if r.status_code != status:
                problems.append(f"{name}: status {r.status_code} != {status}: {err}")
            if err.get("param") != param:
                problems.append(f"{name}: param {err.get('param')!r} != {param!r}: {err}")
            if text.lower() not in err["message"].lower():
                problems.append(f"{name}: message {err['message']!r} lacks {text!r}")
            if param and param not in err["message"] and param != "Authorization":
                problems.append(f"{name}: message {err['message']!r} does not name {param!r}")
            good = client.post("/v1/generate", json=GOOD)
            if good.status_code != 200:
                problems.append(
                    f"{name}: the good request after it failed: {good.status_code} {good.text[:200]}"
                )
            kept = good.extensions["network_stream"] is r.extensions["network_stream"]
            if kept == closes(status, param, kwargs) or (r.headers.get("connection") == "close") != closes(
                status, param, kwargs
            ):
                problems.append(f"{name}: the connection was {'kept' if kept else 'closed'}")
        text = client.get("/metrics").text
    assert not problems, "\n".join(problems)
    assert 'dcar_rejections_total{reason="invalid"}' in text
    assert 'dcar_requests_total{endpoint="/v1/generate",status="500"}' not in text
