"""The Ray Serve deployment: one whole dcar app (model, batching engine, metrics) per replica.

Imported only where Ray is installed (the ``ray`` extra); server/ray_serve.py builds and runs it.
Each replica is a Ray actor that builds ``create_app(settings)`` unchanged, so every route, limit, error and
metric behaves as under ``dcar serve``; Ray's proxy routes requests between replicas, capped per replica by
``max_ongoing_requests``. Three additions, none of which touches the app's code:

- the ASGI lifespan startup waits until the model is loaded and warmed up, so Ray sends no request to a
  replica that would only answer 503 (a replica that fails to load fails its start, and Ray retries it);
- ``check_health`` fails once the engine failed for good (``/healthz`` 503), so Ray replaces the replica;
- every response carries ``X-Dcar-Replica`` (the replica's Ray actor name), and with ``metrics_port`` set
  each replica also serves its own ``/metrics`` on ``metrics_port + rank`` for Prometheus, since through the
  proxy ``/metrics`` answers for whichever replica the request reached.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import start_http_server
from ray import serve

from dcar.server.app import create_app
from dcar.server.settings import Settings

log = logging.getLogger("dcar.ray")

REPLICA_HEADER = b"x-dcar-replica"


class ReplicaHeader:
    """ASGI middleware: adds ``X-Dcar-Replica: <actor name>`` to every HTTP response."""

    def __init__(self, app, replica: str):
        self.app = app
        self.value = replica.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.value)]
            await send(message)

        await self.app(scope, receive, send_tagged)


def start_when_ready(app: FastAPI) -> None:
    """Make the app's lifespan startup return only once the runtime is ready, or raise if it failed.

    ``create_app`` boots in the background so that a plain server answers ``/healthz`` while loading; under
    Ray a replica counts as started when its lifespan startup returns, so that is where we wait.
    """
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as state:
            runtime = a.state.runtime
            while runtime.status in ("loading", "warming"):
                await asyncio.sleep(0.05)
            if runtime.status != "ready":
                raise RuntimeError(f"dcar replica did not become ready ({runtime.status}): {runtime.error}")
            yield state

    app.router.lifespan_context = lifespan


@serve.deployment(name="DcarReplica")
@serve.ingress()
class DcarReplica:
    """One replica: ``create_app(Settings(**settings))`` with its own engine (and GPU, when it has one).

    ``settings`` are overrides of ``DCAR_*``; the replica's environment applies beneath them.
    """

    def __init__(self, settings: dict, metrics_port: int = 0):
        self.settings = Settings(**settings)
        context = serve.get_replica_context()
        self.replica = context.replica_id.to_full_id_str()
        app = create_app(self.settings)
        start_when_ready(app)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        self.dcar_app = app
        if metrics_port:
            port = metrics_port + context.rank.rank
            start_http_server(port, addr="0.0.0.0", registry=app.state.runtime.metrics.registry)
            log.info("%s: /metrics also on port %d", self.replica, port)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.dcar_app

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica (the liveness probe)."""
        runtime = self.dcar_app.state.runtime
        if runtime.status == "failed":
            failure = runtime.error or (runtime.engine.failure if runtime.engine is not None else None)
            raise RuntimeError(f"dcar engine failed: {failure}")
