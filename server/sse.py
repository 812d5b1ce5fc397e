"""Server-Sent Events framing and the wait on a streaming job's progress, with keep-alive ticks.

A request may wait in the queue for minutes before its first step; proxies and load balancers commonly
cut a connection that sends nothing for 60 s. ``job_events`` therefore yields ``None`` every
``keepalive_s`` seconds of silence, and the stream sends an SSE comment (``: keep-alive``), which every
SSE client ignores (the openai SDK included).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from dcar.server.errors import ApiError
from dcar.server.jobs import Job, Progress
from dcar.server.logs import set_outcome

log = logging.getLogger("dcar.server")

KEEPALIVE = ": keep-alive\n\n"


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(job: Job, keepalive_s: float) -> AsyncIterator[Progress | None]:
    """The job's progress items until it is done; ``None`` after each ``keepalive_s`` without one."""
    assert job.events is not None, "a streaming job gets its events queue from Engine.submit"
    while True:
        try:
            item = await asyncio.wait_for(job.events.get(), keepalive_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            yield None
            continue
        if item is None:
            return
        yield item


async def ending_in_an_error_event(
    events: AsyncIterator[str], request, job: Job, error_event: Callable[[ApiError, str], str]
) -> AsyncIterator[str]:
    """``events``; if they raise (a failed image encoding, a bug) after the 200 went out, the stream's
    ``error`` event (500 ``internal_error`` with the request id) ends it, as the API promises, rather than a
    body cut off mid-stream. A departing client is a cancellation, not an Exception: it is not caught."""
    try:
        async for chunk in events:
            yield chunk
    except Exception:
        log.exception("request %s: the event stream failed", job.id)
        set_outcome(request, 500)
        failure = ApiError(500, "internal_error", f"the event stream failed; see the server log for {job.id}")
        yield error_event(failure, job.id)
