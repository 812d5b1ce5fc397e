"""``Idempotency-Key`` on the routes that draw images: a client's retry gets the first response, not a second image.

A client that timed out, or lost the connection, cannot tell whether its image was drawn; retrying doubles
the compute, and without a seed it also gets a different image. With an ``Idempotency-Key`` header (the
IETF httpapi draft's name, as Stripe and others use it) on ``POST`` to ``/v1/generate``, ``/v1/edit``,
``/v1/images/generations`` or ``/v1/images/edits``:

* the first request runs as usual, and its successful (2xx) response is kept for ``idempotency_ttl_s``;
* a request with the same key and the same body gets that response again, byte for byte, with
  ``Idempotent-Replayed: true``; if the first is still running it waits for it instead of drawing again;
* the same key with a different body (or ``Accept``) is a 422 ``idempotency_key_reused`` (the key names one
  request);
* a refused or failed first request (4xx, 5xx) is not kept: its retry runs anew;
* a request with a key runs to the end even when its client leaves (only then can a retry find it); the
  routes otherwise drop a departed client's rows;
* a streamed response (``stream: true``) is not kept: its events were for the connection that saw them.
  Its retry runs anew, after the first has ended.

Keys are scoped by the API key that sent them (one tenant cannot replay another's images) and by route.
Kept responses are bounded by ``idempotency_max_bytes`` (the oldest go first) and live in this process
only: behind a load balancer, a retry that reaches another replica runs there.

Plain ASGI inside the edge middleware (server/app.py), so the API key and the body limit have been checked
before this reads the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.responses import Response

from dcar.server.errors import json_error

ROUTES = frozenset({"/v1/generate", "/v1/edit", "/v1/images/generations", "/v1/images/edits"})
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII: it is logged and compared, never parsed
HEADER = "Idempotency-Key"


@dataclass
class Entry:
    """One key's request: in flight until ``done`` is set; then ``response`` is kept or the entry is gone."""

    fingerprint: bytes
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    kept: bool = False
    expires: float = float("inf")

    def size(self) -> int:
        """Bytes it holds against ``idempotency_max_bytes``: the body and the headers."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers)


class IdempotencyStore:
    """Entries by (tenant, route, key): in-flight ones always, finished ones up to ``max_bytes`` and ``ttl_s``."""

    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self.entries: OrderedDict[tuple[str, str, str], Entry] = OrderedDict()
        self.kept_bytes = 0

    def get(self, key: tuple[str, str, str]) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None and entry.kept and entry.expires <= self.clock():
            self._drop(key)
            return None
        return entry

    def begin(self, key: tuple[str, str, str], fingerprint: bytes) -> Entry:
        entry = Entry(fingerprint)
        self.entries[key] = entry
        return entry

    def finish(self, key: tuple[str, str, str], entry: Entry, keep: bool) -> None:
        """The first request ended: keep its response (``keep``) within the byte budget, or forget the key."""
        if keep and entry.size() <= self.max_bytes:
            entry.kept, entry.expires = True, self.clock() + self.ttl_s
            self.kept_bytes += entry.size()
            self.entries.move_to_end(key)
            self._evict()
        elif self.entries.get(key) is entry:
            del self.entries[key]
        entry.done.set()

    def _evict(self) -> None:
        now = self.clock()
        for key in [k for k, e in self.entries.items() if e.kept and e.expires <= now]:
            self._drop(key)
        while self.kept_bytes > self.max_bytes:  # the oldest kept first (insertion order = finish order)
            oldest = next(k for k, e in self.entries.items() if e.kept)
            self._drop(oldest)

    def _drop(self, key: tuple[str, str, str]) -> None:
        self.kept_bytes -= self.entries.pop(key).size()


class IdempotencyMiddleware:
    """Replays kept responses by key; see the module docstring for the rules."""

    def __init__(self, app, runtime):
        self.app = app
        self.runtime = runtime
        settings = runtime.settings
        self.store = IdempotencyStore(settings.idempotency_ttl_s, settings.idempotency_max_bytes)

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in ROUTES
            or self.store.ttl_s <= 0
        ):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"idempotency-key")
        if raw is None:
            return await self.app(scope, receive, send)
        key = raw.decode("latin-1")
        rid = scope.get("state", {}).get("request_id")
        if not KEY_RE.match(key):
            self.runtime.metrics.rejected("invalid")
            return await json_error(
                400,
                "invalid_idempotency_key",
                f"{HEADER} must be 1 to 255 visible ASCII characters (no spaces), got {len(key)} characters",
                HEADER,
                rid,
            )(scope, receive, send)
        body = await _read_body(receive)
        if body is None:  # the client left while sending its body: 499, as errors.py answers without a key
            return await Response(status_code=499)(scope, receive, send)
        tenant = hashlib.sha256(headers.get(b"authorization", b"")).hexdigest()
        scoped = (tenant, scope["path"], key)
        fingerprint = _fingerprint(headers.get(b"content-type", b""), headers.get(b"accept", b""), body)
        while (entry := self.store.get(scoped)) is not None:
            if entry.fingerprint != fingerprint:
                self.runtime.metrics.idempotent("conflict")
                self.runtime.metrics.rejected("invalid")
                return await json_error(
                    422,
                    "idempotency_key_reused",
                    f"{HEADER} {key!r} was sent with a different request (body or Accept) within "
                    f"idempotency_ttl_s={self.store.ttl_s:g}; a key names one request",
                    HEADER,
                    rid,
                )(scope, receive, send)
            if entry.kept:
                self.runtime.metrics.idempotent("replayed")
                return await _replay(entry, send)
            await entry.done.wait()  # the first is still running: its response, or a fresh run if it failed
        self.runtime.metrics.idempotent("first")
        entry = self.store.begin(scoped, fingerprint)
        keep = False
        try:
            keep = await self._run(entry, scope, body, receive, send)
        finally:
            self.store.finish(scoped, entry, keep)
        return None

    async def _run(self, entry: Entry, scope, body: bytes, receive, send) -> bool:
        """The first request, its response copied into ``entry``; True when it is complete and worth keeping."""
        streaming = asyncio.Event()  # a streamed response: its client's departure must reach the route
        state = {"body_sent": False, "complete": False}

        async def replayed_receive():
            if not state["body_sent"]:
                state["body_sent"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect" and not streaming.is_set():
                await streaming.wait()  # hold it back: the request runs to its end for the retry
            return message

        async def copying_send(message):
            if message["type"] == "http.response.start":
                entry.status = message["status"]
                entry.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                content_type = dict(entry.headers).get(b"content-type", b"")
                if content_type.startswith(b"text/event-stream"):
                    streaming.set()
            elif message["type"] == "http.response.body" and not streaming.is_set():
                entry.body += message.get("body", b"")
                state["complete"] = not message.get("more_body", False)
            await send(message)  # uvicorn ignores a send to a client that has left

        await self.app(scope, replayed_receive, copying_send)
        return state["complete"] and 200 <= entry.status < 300 and not streaming.is_set()


BOUNDARY_RE = re.compile(rb";\s*boundary=\"?([^\";]+)\"?", re.IGNORECASE)


def _fingerprint(content_type: bytes, accept: bytes, body: bytes) -> bytes:
    """The request's identity: its content type, what it accepts and its body, a multipart boundary aside.

    ``Accept`` chooses the response's form (``image/png`` is the raw image, else JSON), so a retry that asks
    for another form is another request. Clients draw a new random boundary each time they build a
    multipart body (httpx, hence the openai SDK's own retries of an edit), so the same form sent twice
    differs in its boundary only.
    """
    match = BOUNDARY_RE.search(content_type)
    if match:
        body = body.replace(b"--" + match.group(1), b"--<boundary>")
        content_type = content_type[: match.start()] + content_type[match.end() :]
    head = content_type.strip().lower() + b"\0" + accept.strip().lower()
    return hashlib.sha256(head + b"\0" + body).digest()


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _replay(entry: Entry, send) -> None:
    headers = [*entry.headers, (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": entry.status, "headers": headers})
    await send({"type": "http.response.body", "body": entry.body, "more_body": False})
