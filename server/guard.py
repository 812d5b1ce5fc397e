"""Connection hygiene in front of the app: timeouts for slow and idle clients, and a connection cap.

uvicorn has a keep-alive timeout between requests but none for the request itself: a client that sends its
headers at one byte a second, opens a socket and never writes, or stops halfway through a body holds its
connection (and a file descriptor) forever, and enough of them exhaust the open-files limit so that every new
client fails. ``ConnectionGuard.protocol()`` is uvicorn's httptools protocol with four limits added:

* ``keepalive_timeout_s``: a connection with no request in progress (fresh, or between requests) is closed
  when idle this long (uvicorn's own timer between requests, ours before the first);
* ``header_timeout_s``: from the first byte of a request to the end of its headers; then 408 and close;
* ``body_timeout_s``: from the end of the headers to the end of the body; then 408 and close (the app sees a
  disconnect: the request ends as 499);
* ``max_connections``: a connection beyond it gets 503 ``too_many_connections`` and is closed at once,
  keeping the process below the open-files limit.

Every close and refusal is counted (``dcar_connections_closed_total{reason}``,
``dcar_connections_refused_total``, ``dcar_connections_open``) and logged, at most once per ``LOG_EVERY_S``
per reason with the count since the last line (a flood must not flood the log): timeouts and refusals at
WARNING, idle closes at INFO (browsers open spare connections they may never use).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("dcar.server")
LOG_EVERY_S = 10.0
CLOSE_REASONS = ("idle", "header_timeout", "body_timeout")


def _raw_response(status: str, code: str, message: str, extra: dict[str, str] | None = None) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": code,
                "message": message,
                "param": None,
                "type": "server_error" if status.startswith("5") else "invalid_request_error",
            }
        }
    )
    headers = {
        "content-type": "application/json",
        "connection": "close",
        "content-length": str(len(body)),
        **(extra or {}),
    }
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"HTTP/1.1 {status}\r\n{head}\r\n{body}".encode()


class ConnectionGuard:
    """The limits, the counters and the log of one server; ``protocol()`` gives uvicorn's ``http`` class."""

    def __init__(self, settings, registry: CollectorRegistry | None = None):
        self.max_connections = settings.max_connections
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.keepalive_timeout_s = settings.keepalive_timeout_s
        self.open = 0
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.closed = Counter(
            "dcar_connections_closed",
            "Connections closed by the server's timeouts, by reason (idle, header_timeout, body_timeout).",
            ["reason"],
            **kw,
        )
        self.refused = Counter(
            "dcar_connections_refused", "Connections refused (503) at max_connections.", **kw
        )
        self.gauge = Gauge("dcar_connections_open", "Open client connections.", **kw)
        for reason in CLOSE_REASONS:
            self.closed.labels(reason)
        self._last_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def note(self, reason: str, peer, detail: str) -> None:
        """Count and (rate-limited) log one close or refusal."""
        if reason == "refused":
            self.refused.inc()
        else:
            self.closed.labels(reason).inc()
        now = time.monotonic()
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        if now - self._last_log.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            n = self._unlogged.pop(reason)
            self._last_log[reason] = now
            more = f" ({n - 1} more since the last report)" if n > 1 else ""
            log.log(
                logging.INFO if reason == "idle" else logging.WARNING,
                "connection from %s %s: %s%s",
                _peer(peer),
                "refused" if reason == "refused" else "closed",
                detail,
                more,
            )

    def protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's httptools protocol with this guard's limits (plain uvicorn h11 without httptools)."""
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
            log.warning("httptools is not installed: connection timeouts and max_connections are off")
            from uvicorn.protocols.http.h11_impl import H11Protocol

            return H11Protocol
        return type("GuardedHttpToolsProtocol", (_Guarded, HttpToolsProtocol), {"guard": self})


def _peer(peer) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"


if TYPE_CHECKING:  # what _Guarded is mixed into (at run time the class is built in ConnectionGuard.protocol)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Protocol
else:
    _Protocol = object


class _Guarded(_Protocol):
    """Mixed into uvicorn's ``HttpToolsProtocol``: one timer per connection, re-armed at each phase."""

    guard: ConnectionGuard
    _timer: asyncio.TimerHandle | None = None
    _refused = False

    def connection_made(self, transport) -> None:
        g = self.guard
        if g.open >= g.max_connections:
            self._refused = True
            self.transport = transport
            wait = max(1, round(g.keepalive_timeout_s))  # idle connections are closed within this
            transport.write(
                _raw_response(
                    "503 Service Unavailable",
                    "too_many_connections",
                    f"the server holds max_connections={g.max_connections} connections; retry after {wait} s",
                    {"retry-after": str(wait)},
                )
            )
            transport.close()
            g.note(
                "refused",
                transport.get_extra_info("peername"),
                f"max_connections={g.max_connections} reached",
            )
            return
        g.open += 1
        g.gauge.set(g.open)
        super().connection_made(transport)
        self._arm("idle", g.keepalive_timeout_s)

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        self._disarm()
        self.guard.open -= 1
        self.guard.gauge.set(self.guard.open)
        super().connection_lost(exc)

    # httptools parser callbacks: the phases of a request
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm("header_timeout", self.guard.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(
            "body_timeout", self.guard.body_timeout_s
        )  # on_message_complete follows at once without one

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # the app has the request; between requests uvicorn's keep-alive timer takes over

    def _arm(self, reason: str, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire, reason, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, reason: str, seconds: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if reason != "idle" and (cycle is None or not cycle.response_started):
            what = "its headers" if reason == "header_timeout" else "its body"
            setting = "header_timeout_s" if reason == "header_timeout" else "body_timeout_s"
            self.transport.write(
                _raw_response(
                    "408 Request Timeout",
                    "request_timeout",
                    f"the request did not send {what} within {setting}={seconds:g}",
                )
            )
        self.transport.close()
        self.guard.note(reason, self.client, f"{reason.replace('_', ' ')} ({seconds:g} s)")
