"""The errors the engine answers with when it will not, or no longer can, serve a request.

Pure construction: the engine (server/engine.py) decides when each applies and passes in what it knows
(its status, why it failed, its backlog, the drain deadline). Admission's own refusals (429 queue full,
400 cannot finish in time) are in server/admission.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dcar.server.admission import retry_after
from dcar.server.errors import ApiError


def refusal(
    status: str, failure: str | None, backlog_s: Callable[[], float], drain_deadline: float | None
) -> ApiError:
    """The 503 for a request arriving while the engine is not "ready".

    ``backlog_s`` (predicted seconds until the accepted work is done) is only asked when the server is going
    away: its forecast is wasted work for a server that is starting or failed.
    """
    if status == "starting":
        return ApiError(
            503,
            "not_ready",
            "the model is still loading or warming up; retry shortly",
            headers={"Retry-After": "1"},
            reason="not_ready",
        )
    if status == "failed":
        return ApiError(
            503,
            "engine_failed",
            f"the engine failed and serves nothing: {failure}",
            reason="not_ready",
        )
    # Until the accepted work is done (or the drain gives up) this server is going away: retry elsewhere
    # or after its restart.
    left = backlog_s()
    if drain_deadline is not None:
        left = min(left, max(0.0, drain_deadline - time.monotonic()))
    return ApiError(
        503,
        "shutting_down",
        "the server is shutting down and accepts no new requests",
        headers=retry_after(left),
        reason="draining",
    )


def drain_timed_out(timeout: float) -> ApiError:
    """The 503 for an accepted request still unfinished when the drain's ``timeout`` ran out."""
    return ApiError(
        503,
        "shutting_down",
        f"the server shut down before this request finished (drain timeout {timeout:g} s)",
        headers=retry_after(1.0),
        reason=None,
    )


def deadline_exceeded(timeout: float) -> ApiError:
    """The 504 for a request that did not finish within its ``timeout`` seconds."""
    return ApiError(
        504,
        "deadline_exceeded",
        f"the request did not finish within timeout={timeout:g} s",
        param="timeout",
        reason=None,
    )
