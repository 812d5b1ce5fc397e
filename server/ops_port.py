"""``DCAR_OPS_PORT``: a second listener for the probes and the scrape, outside ``max_connections``.

On the main port, clients that hold every connection (``max_connections``, slow or idle ones until their
timeouts) also lock out the kubelet's probes and Prometheus: the pod is restarted as dead and its metrics
go missing exactly when they matter. Triton answers metrics on a port of their own for the same reason.
This listener serves only ``GET``/``HEAD`` of ``/healthz``, ``/readyz`` and ``/metrics`` (404 for anything
else, so it is no way around the main port's limits), from the same app and process, with no lifespan of
its own: ``dcar serve`` binds its port first (a taken port stops it before the model loads), listens once
the main server started, and stops it last, so readiness can say "draining" until the end. Keep it off the
clients' network (a NetworkPolicy, or no Service port for it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import uvicorn
from uvicorn.server import STARTUP_FAILURE

from dcar.server.errors import json_error

log = logging.getLogger("uvicorn.error")

OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class OpsOnly:
    """ASGI: the probe and scrape routes of ``app``; 404 (JSON, as every error here) for the rest."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # the lifespan belongs to the main listener
            return None
        if scope.get("path") in OPS_PATHS and scope.get("method") in ("GET", "HEAD"):
            if scope["method"] == "HEAD":  # FastAPI routes answer GET only; a HEAD probe gets the headers
                scope = {**scope, "method": "GET"}
                send = _without_body(send)
            return await self.app(scope, receive, send)
        message = f"the ops port serves only GET {', '.join(sorted(OPS_PATHS))}"
        return await json_error(404, "not_found", message)(scope, receive, send)


def _without_body(send):
    async def wrapped(message):
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return wrapped


class OpsListener:
    """A uvicorn server on ``host:port`` for ``OpsOnly(app)``, run inside the main server's event loop."""

    def __init__(self, app, host: str, port: int, keepalive_s: float):
        # (uvicorn annotates timeout_keep_alive as int; floats work, as for the main listener)
        config = uvicorn.Config(
            OpsOnly(app),
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_keep_alive=keepalive_s,  # type: ignore[arg-type]
        )
        self.server = uvicorn.Server(config)
        self._loop_task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Bind the port, not listening yet: called before the main server starts (its port, the model
        load), so that a taken port stops the process at once, with uvicorn's status for a taken port."""
        host, port = self.server.config.host, self.server.config.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            log.error("the ops port: %s", exc)
            sys.exit(STARTUP_FAILURE)
        self._sock = sock

    async def start(self) -> None:
        """Listen on the port ``bind`` took."""
        config = self.server.config
        if not config.loaded:
            config.load()
        self.server.lifespan = config.lifespan_class(config)  # "off": nothing starts
        assert self._sock is not None, "bind() first"
        await self.server.startup(sockets=[self._sock])
        self._loop_task = asyncio.ensure_future(self.server.main_loop())  # the Date header's ticks

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        if self.server.started:
            await self.server.shutdown()
        if self._sock is not None:
            self._sock.close()
