"""Server-Sent Events framing and the wait on a streaming job's progress, with keep-alive ticks.

A request may wait in the queue for minutes before its first step; proxies and load balancers commonly
cut a connection that sends nothing for 60 s. ``job_events`` therefore yields ``None`` every
``keepalive_s`` seconds of silence, and the stream sends an SSE comment (``: keep-alive``), which every
SSE client ignores (the openai SDK included).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from dcar.server.jobs import Job, Progress

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
