"""``create_app(settings)``: the FastAPI app, its lifespan and the edge middleware.

The lifespan starts ``Runtime.boot`` as a task and returns at once (server/runtime.py); on shutdown it
drains: admission stops (503), accepted rows finish (up to ``drain_timeout_s``), then the worker stops.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from dcar.model.pipeline import Pipeline
from dcar.server.auth import refusal
from dcar.server.errors import ApiError, install_handlers, json_error
from dcar.server.idempotency import IdempotencyMiddleware
from dcar.server.logs import OUTCOME, AccessLog, outcome
from dcar.server.routes import router
from dcar.server.routes_openai import router as openai_router
from dcar.server.routes_ui import router as ui_router
from dcar.server.runtime import Runtime
from dcar.server.settings import Settings

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class EdgeMiddleware:
    """Request id, API key (401), body-size limit (413) and per-request metrics, as plain ASGI (streaming-safe).

    The key and the declared size are checked from the headers, before the app reads any of the body; a
    refused request that announced a body gets ``Connection: close``, so the server never reads it either.

    The endpoint label is the matched route's path template (``other`` for unknown paths), so it stays
    bounded whatever clients send; a request refused here is counted under its route too (``routes``: the
    app's routes, each with its template).
    """

    def __init__(self, app, runtime: Runtime, routes: Sequence[BaseRoute] = ()):
        self.app = app
        self.runtime = runtime
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if REQUEST_ID.match(incoming) else f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = rid
        limit = self.runtime.settings.max_body_bytes
        status = {"code": 500, "started": False, "ended": False, "failed": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["ended"] = True
            await send(message)

        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            denied = refusal(scope.get("path", ""), headers, self.runtime.settings.api_keys)
            if denied is not None:
                await self._refuse(
                    send_wrapper, denied, rid, has_body=length > 0 or b"transfer-encoding" in headers
                )
            elif length > limit:
                await self._too_large(send_wrapper, length, limit, rid)
            else:
                await self.app(scope, _limited(receive, limit), send_wrapper)
        except BodyTooLarge as e:
            if not status["started"]:
                await self._too_large(send_wrapper, e.size, limit, rid)
        except Exception:
            status["failed"] = True
            raise
        finally:
            endpoint = _endpoint(scope, self.routes)
            # a stream's 200 went out first: count how it ended (its error event, or 499 if the client left)
            code = outcome(scope, status["started"], status["ended"], status["failed"], status["code"])
            scope["state"][OUTCOME] = code  # for the access record (server/logs.py)
            self.runtime.metrics.request(endpoint, code, time.perf_counter() - t0)

    async def _refuse(self, send, err: ApiError, rid: str, has_body: bool) -> None:
        self.runtime.metrics.rejected(err.reason or "unauthorized")
        headers = {**err.headers, **({"Connection": "close"} if has_body else {})}
        response = json_error(err.status, err.code, err.message, err.param, rid, headers)
        await response({"type": "http"}, _no_receive, send)

    async def _too_large(self, send, size: int, limit: int, rid: str) -> None:
        self.runtime.metrics.rejected("too_large")
        response = json_error(
            413,
            "body_too_large",
            f"the request body is at least {size} bytes; the limit is max_body_bytes={limit}",
            None,
            rid,
            {"Connection": "close"},
        )  # rest unread
        await response({"type": "http"}, _no_receive, send)


class BodyTooLarge(StarletteHTTPException):
    """Raised by ``receive`` mid-body; an HTTPException so that FastAPI's body parsing lets it through as 413."""

    def __init__(self, size: int, limit: int):
        super().__init__(
            413, f"the request body is over {limit} bytes (read {size}); the limit is max_body_bytes={limit}"
        )
        self.size = size


def _endpoint(scope, routes: Sequence[BaseRoute]) -> str:
    """The request's route template, ``other`` for an unknown path. A request refused here (401, 413) never
    reached the router, which sets ``scope["route"]``: its route is looked up, and set for the access record."""
    if scope.get("route") is None:
        scope["route"] = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(scope.get("route"), "path", None) or "other"


async def _no_receive():
    return {"type": "http.disconnect"}


def _limited(receive, limit: int):
    """``receive`` that raises ``BodyTooLarge`` once more than ``limit`` body bytes arrived (chunked uploads)."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(seen, limit)
        return message

    return wrapped


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None) -> FastAPI:
    """The app for ``settings``; ``pipeline`` injects an already built model (tests, benchmarks)."""
    settings = settings or Settings()
    runtime = Runtime(settings, pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        boot = asyncio.create_task(runtime.boot(), name="dcar-boot")
        app.state.boot = boot
        try:
            yield
        finally:
            runtime.begin_drain()
            if not boot.done():
                await asyncio.wait({boot}, timeout=settings.drain_timeout_s)
            await runtime.shutdown()

    app = FastAPI(
        title="dcar",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=runtime.tracing.telemetry,
        description="DC-AR text-to-image and inpainting server (iteration-level batching).",
    )
    app.state.runtime = runtime
    install_handlers(app, runtime.metrics)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(ui_router)
    # inside the edge: the API key and the body limit are checked before it reads a body
    app.add_middleware(IdempotencyMiddleware, runtime=runtime)
    routes = [r for r in app.routes if hasattr(r, "path")]  # FastAPI's own (/docs, ...); ours, included:
    routes += [*router.routes, *openai_router.routes, *ui_router.routes]
    app.add_middleware(EdgeMiddleware, runtime=runtime, routes=routes)
    # outside the edge, so that it sees its request id and its refusals, and times everything
    app.add_middleware(AccessLog, log_prompts=settings.log_prompts)
    return app
